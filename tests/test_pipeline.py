"""`align run`: stages run in order, complete ones are skipped, an interrupted one resumes, and
`--from` reruns a stage and those after it. The default recipe runs here in a short version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.config import ConfigError
from align.pipeline import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "recipes" / "addition.yaml"

# The default recipe's code path with everything small: same stages, fewer steps.
SHORT = (
    "task.n_sft=400", "task.n_pref=200", "task.n_prompts=64", "task.n_eval=16",
    "init_model.hidden=32", "init_model.layers=2",
    "sft.train.epochs=1", "sft.train.batch_size=32", "sft.train.warmup_steps=2", "sft.train.eval_every=5",
    "rm.train.epochs=1", "rm.train.batch_size=32", "rm.train.warmup_steps=2", "rm.train.eval_every=5",
    "ppo.ppo.total_episodes=32", "ppo.ppo.rollout_batch_size=16", "ppo.ppo.mini_batch_size=8",
    "ppo.ppo.micro_batch_size=8", "ppo.ppo.ppo_epochs=1", "ppo.ppo.eval_every=1", "ppo.eval.max_samples=16",
)


def short(root: Path, *extra: str) -> tuple[str, ...]:
    return (f"output_root={root}", *SHORT, *extra)


def mtime(path: Path) -> float:
    return path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "run"
    run_recipe(str(DEFAULT), short(root))
    return root


def test_short_default_recipe_runs_every_stage_and_reports(finished: Path):
    for stage in ("sft", "rm", "ppo"):
        assert (finished / stage / "summary.json").is_file(), stage
        assert (finished / stage / "model" / "config.json").is_file() or \
            (finished / stage / "model" / "adapter_config.json").is_file()
    results = json.loads((finished / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["sft", "sft+ppo"]
    for m in results["models"]:
        assert {"gold_reward", "reward", "kl_to_reference", "perplexity", "token_accuracy"} <= set(m["metrics"])
    assert results["models"][0]["metrics"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # SFT vs itself
    assert results["models"][1]["compute"]["stages"] == ["sft", "rm", "ppo"]  # the reward model is paid for too
    report = (finished / "report" / "report.md").read_text()
    assert "sft+ppo" in report and "gold" in report
    assert (finished / "recipe.yaml").is_file()


def test_complete_stages_are_skipped(finished: Path, capsys: pytest.CaptureFixture):
    before = {s: mtime(finished / s / "summary.json") for s in ("sft", "rm", "ppo")}
    run_recipe(str(DEFAULT), short(finished))
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 6  # task, init_model, sft, rm, ppo, eval
    assert {s: mtime(finished / s / "summary.json") for s in before} == before


def test_from_reruns_that_stage_and_later_ones_only(finished: Path, tmp_path: Path):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    before = {s: mtime(root / s / "summary.json") for s in ("sft", "rm", "ppo")}
    eval_before = mtime(root / "eval" / "results.json")
    run_recipe(str(DEFAULT), short(root), from_stage="ppo")
    assert mtime(root / "sft" / "summary.json") == before["sft"]
    assert mtime(root / "rm" / "summary.json") == before["rm"]
    assert mtime(root / "ppo" / "summary.json") != before["ppo"]
    assert mtime(root / "eval" / "results.json") != eval_before


def test_an_interrupted_stage_resumes(finished: Path, tmp_path: Path):
    """Kill `align run` (SIGKILL) once PPO has written a checkpoint; rerunning resumes PPO from it."""
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    args = [sys.executable, "-m", "align", "run", str(DEFAULT), "--from", "ppo"]
    longer = ["ppo.ppo.total_episodes=160", "ppo.ppo.save_every=2", "ppo.ppo.eval_every=100"]
    for item in short(root, *longer):
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = root / "ppo" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert latest.exists(), proc.stdout.read().decode() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "ppo" / "summary.json").exists()
    resume = args[:]
    del resume[resume.index("--from"):resume.index("--from") + 2]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ppo: resuming the interrupted run" in done.stdout
    assert "sft: complete, skipped" in done.stdout
    assert json.loads((root / "ppo" / "summary.json").read_text())["steps"] == 10


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")
                                          if "output_root" in p.read_text()))
def test_every_recipe_parses_and_resolves(recipe: str):
    plan = load_recipe(str(REPO / "recipes" / recipe))
    assert plan.stages, recipe
    if "ppo" in plan.stages:
        ppo = plan.stages["ppo"]
        assert ppo.model.path.endswith("sft") and (ppo.reward.model or ppo.reward.function)
        assert ppo.data.prompt_template == plan.stages["sft"].data.prompt_template


def test_a_misspelt_recipe_key_names_it_and_suggests_the_nearest(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown config key 'sft\.train\.lrr'; did you mean 'sft\.train\.lr'"):
        load_recipe(str(DEFAULT), (f"output_root={tmp_path}", "sft.train.lrr=1"))


def test_the_recipe_seed_seeds_every_stage_the_initial_weights_included(tmp_path: Path):
    plan = load_recipe(str(DEFAULT), (f"output_root={tmp_path}", "seed=3"))
    assert plan.stages["task"]["seed"] == plan.stages["init_model"].seed == 3
    assert all(plan.stages[s].seed == 3 for s in ("sft", "rm", "ppo", "eval"))
    # A section's own seed wins.
    plan = load_recipe(str(DEFAULT), (f"output_root={tmp_path}", "seed=3", "init_model.seed=7", "task.seed=5"))
    assert (plan.stages["task"]["seed"], plan.stages["init_model"].seed, plan.stages["sft"].seed) == (5, 7, 3)
