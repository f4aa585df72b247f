"""The multi-method recipe (recipes/addition_all.yaml) in a short version: PPO, DPO, GRPO, RLOO and
best-of-n from one SFT checkpoint and reward, at one budget; every method's row with its compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.config import ConfigError
from align.pipeline import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
ALL = REPO / "recipes" / "addition_all.yaml"

SHORT = (
    "budget_episodes=32", "task.n_sft=400", "task.n_pref=200", "task.n_prompts=64", "task.n_eval=16",
    "init_model.hidden=32", "init_model.layers=2",
    "sft.train.epochs=1", "sft.train.batch_size=32", "sft.train.warmup_steps=2", "sft.train.eval_every=5",
    "rm.train.epochs=1", "rm.train.batch_size=32", "rm.train.warmup_steps=2", "rm.train.eval_every=5",
    "ppo.ppo.rollout_batch_size=16", "ppo.ppo.mini_batch_size=8", "ppo.ppo.micro_batch_size=8",
    "ppo.ppo.ppo_epochs=1", "ppo.eval.max_samples=16",
    "dpo.train.batch_size=16", "dpo.train.warmup_steps=0",
    "grpo.ppo.rollout_batch_size=16", "grpo.ppo.n_samples_per_prompt=4", "grpo.ppo.mini_batch_size=16",
    "grpo.ppo.micro_batch_size=8", "grpo.eval.max_samples=16",
    "rloo.ppo.rollout_batch_size=16", "rloo.ppo.n_samples_per_prompt=4", "rloo.ppo.mini_batch_size=16",
    "rloo.ppo.micro_batch_size=8", "rloo.eval.max_samples=16",
    "dr_grpo.ppo.rollout_batch_size=16", "dr_grpo.ppo.n_samples_per_prompt=4", "dr_grpo.ppo.mini_batch_size=16",
    "dr_grpo.ppo.micro_batch_size=8", "dr_grpo.eval.max_samples=16",
    *(f"{m}.{k}" for m in ("reinforce_pp", "remax") for k in (
        "ppo.rollout_batch_size=16", "ppo.mini_batch_size=16", "ppo.micro_batch_size=8", "eval.max_samples=16")),
    "eval.best_of=2",
)


def test_budget_is_shared_and_a_contradiction_is_an_error(tmp_path: Path) -> None:
    plan = load_recipe(str(ALL), (f"output_root={tmp_path}", "budget_episodes=512"))
    assert plan.stages["ppo"].ppo.total_episodes == 512
    assert plan.stages["grpo"].ppo.total_episodes == plan.stages["rloo"].ppo.total_episodes == 512
    dpo = plan.stages["dpo"].train
    assert dpo.max_steps * dpo.batch_size * dpo.grad_accum == 512
    assert plan.stages["eval"].names == ["sft", "sft+ppo", "sft+dpo", "sft+grpo", "sft+dr_grpo", "sft+rloo",
                                         "sft+reinforce_pp", "sft+remax"]
    assert plan.stages["grpo"].reward.model == str(tmp_path / "rm")
    with pytest.raises(ConfigError, match="budget_episodes"):
        load_recipe(str(ALL), (f"output_root={tmp_path}", "grpo.ppo.total_episodes=64"))


def test_short_multi_method_recipe_reports_every_method_with_its_compute(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_recipe(str(ALL), (f"output_root={root}", *SHORT))
    results = json.loads((root / "eval" / "results.json").read_text())
    rows = {m["name"]: m for m in results["models"]}
    assert list(rows) == ["sft", "sft (best-of-2)", "sft+ppo", "sft+dpo", "sft+grpo", "sft+dr_grpo", "sft+rloo",
                          "sft+reinforce_pp", "sft+remax"]
    for name, m in rows.items():
        assert m["compute"]["wall_time_sec"] > 0 and m["compute"]["tokens"] > 0, name
        assert "gold_reward" in m["metrics"] and "reward" in m["metrics"], name
    for stage in ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax"):
        assert rows[f"sft+{stage}"]["compute"]["stages"] == ["sft", "rm", stage]
        assert json.loads((root / stage / "summary.json").read_text())["episodes"] == 32
    assert rows["sft (best-of-2)"]["compute"]["episodes"] == 2 * results["n_prompts"]
    table = (root / "report" / "report.md").read_text()
    for name in rows:
        assert name in table, name
    (curve,) = results["best_of_curves"]  # the recipe's best-of-n curve, from one draw of 16
    assert curve["model"] == "sft" and curve["samples"] == 16
    assert [p["compute"]["episodes"] for p in curve["points"]] == [n * results["n_prompts"] for n in (1, 2, 4, 8, 16)]


def test_every_expectation_names_a_model_the_recipe_evaluates() -> None:
    from align.expect import parse_expectations
    from align.multiseed import curve_name

    plan = load_recipe(str(ALL))
    ev = plan.stages["eval"]
    base = ev.best_of_models or ev.names[:1]
    known = {*ev.names, *(f"{m} (best-of-{ev.best_of})" for m in base),
             *(curve_name(m, n) for m in base for n in ev.best_of_curve)}
    expectations = parse_expectations(plan.recipe.expect, str(ALL))
    assert expectations and plan.recipe.seeds == "0-4"
    for e in expectations:
        assert {e.model, e.minus} - {None} <= known, e
