"""Seeds as an axis: `align run RECIPE --seeds` runs the pipeline per seed under <root>/seed-N/,
reuses complete stages, and reports over seeds with intervals and paired comparisons; `--check`
tests the recipe's `expect:` block and exits non-zero when one fails."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align.cli import main
from align.multiseed import render_markdown, summarize, seed_runs, values

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "recipes" / "addition.yaml"


def fake_seed(root: Path, seed: int, gold: dict[str, list[float]], kl: dict[str, float]) -> None:
    """A seed directory as `align run` leaves it: eval/results.json, responses, an RM summary."""
    (root / f"seed-{seed}" / "eval" / "responses").mkdir(parents=True)
    models = []
    for name, per_prompt in gold.items():
        lines = "".join(json.dumps({"prompt": f"p{i}", "gold_reward": g}) + "\n" for i, g in enumerate(per_prompt))
        (root / f"seed-{seed}" / "eval" / "responses" / f"{name}.jsonl").write_text(lines)
        models.append({"name": name, "metrics": {"gold_reward": sum(per_prompt) / len(per_prompt),
                                                 "kl_to_reference": kl[name]},
                       "responses": f"responses/{name}.jsonl", "compute": {"wall_time_sec": 1.0}})
    results = {"n_prompts": len(next(iter(gold.values()))), "baseline": "sft", "models": models, "has_gold": True}
    (root / f"seed-{seed}" / "eval" / "results.json").write_text(json.dumps(results))
    (root / f"seed-{seed}" / "rm").mkdir()
    (root / f"seed-{seed}" / "rm" / "summary.json").write_text(json.dumps({"val/accuracy": 0.9 + seed / 100}))


def test_summary_marks_a_planted_difference_significant_and_a_null_not(tmp_path: Path) -> None:
    rng = random.Random(0)
    for seed in range(5):
        base = [float(rng.random() < 0.5) for _ in range(100)]
        better = [float(rng.random() < 0.8) for _ in range(100)]
        same = [float(rng.random() < 0.5) for _ in range(100)]
        fake_seed(tmp_path, seed, {"sft": base, "sft+ppo": better, "sft+noop": same},
                  {"sft": 0.0, "sft+ppo": 1.0 + seed / 10, "sft+noop": 0.1})
    runs = seed_runs(tmp_path)
    s = summarize(runs)
    assert s.seeds == [0, 1, 2, 3, 4] and s.models == ["sft", "sft+ppo", "sft+noop"]
    assert s.paired["sft+ppo"].significant and not s.paired["sft+noop"].significant
    kl = s.intervals["sft+ppo"]["kl_to_reference"]
    assert kl.mean == pytest.approx(1.2) and kl.low <= 1.2 <= kl.high and kl.n == 5
    text = render_markdown(s, "Python 3.11")
    assert "| sft+noop |" in text and "n.s. (not significant)" in text
    assert "Significantly different from sft: sft+ppo." in text
    assert "Not significantly different from sft: sft+noop." in text
    assert "## Provenance" in text and str(tmp_path) not in text  # no machine paths in a report
    assert values(runs)[3]["rm/val/accuracy"] == pytest.approx(0.93)
    assert values(runs)[3]["sft+ppo:kl_to_reference"] == pytest.approx(1.3)


def test_one_seed_has_no_interval(tmp_path: Path) -> None:
    fake_seed(tmp_path, 7, {"sft": [0.0, 1.0], "sft+ppo": [1.0, 1.0]}, {"sft": 0.0, "sft+ppo": 0.5})
    s = summarize(seed_runs(tmp_path))
    iv = s.intervals["sft+ppo"]["gold_reward"]
    assert iv.low == iv.high == iv.mean == 1.0 and "single seed" in iv.method


SHORT = (
    "task.n_sft=200", "task.n_pref=100", "task.n_prompts=32", "task.n_eval=8",
    "init_model.hidden=32", "init_model.layers=1",
    "sft.train.epochs=1", "sft.train.batch_size=32", "sft.train.warmup_steps=1", "sft.train.eval_every=5",
    "rm.train.epochs=1", "rm.train.batch_size=32", "rm.train.warmup_steps=1", "rm.train.eval_every=5",
    "ppo.ppo.total_episodes=16", "ppo.ppo.rollout_batch_size=16", "ppo.ppo.mini_batch_size=16",
    "ppo.ppo.micro_batch_size=16", "ppo.ppo.ppo_epochs=1", "ppo.ppo.eval_every=1", "ppo.eval.max_samples=8",
    "eval.sampled=false",
)


def run(*args: str):
    return CliRunner().invoke(main, ["run", str(DEFAULT), *args])


@pytest.mark.slow
def test_seeds_run_per_seed_reuse_complete_stages_and_check_expectations(tmp_path: Path) -> None:
    sets = [x for s in (f"output_root={tmp_path}", *SHORT) for x in ("--set", s)]
    result = run("--seeds", "0-1", *sets)
    assert result.exit_code == 0, result.output + result.stderr
    for seed in (0, 1):
        assert (tmp_path / f"seed-{seed}" / "ppo" / "summary.json").is_file()
        cfg = yaml.safe_load((tmp_path / f"seed-{seed}" / "sft" / "config.yaml").read_text())
        assert cfg["seed"] == seed
    report = (tmp_path / "report" / "multiseed.md").read_text()
    assert "Comparison over 2 seeds (0, 1)" in report and "| sft+ppo |" in report
    again = run("--seeds", "0-1", *sets)
    assert again.exit_code == 0 and again.stdout.count("complete, skipped") == 12  # 6 stages x 2 seeds

    recipe = yaml.safe_load(DEFAULT.read_text())
    recipe["seeds"] = "0-1"
    recipe["expect"] = [{"metric": "rm/val/accuracy", "min": 0.0},
                        {"metric": "gold_reward", "model": "sft+ppo", "min": 2.0, "name": "impossible"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    checked = CliRunner().invoke(main, ["run", str(path), "--check", *sets])
    assert checked.exit_code == 1, checked.output + checked.stderr
    assert "PASS  rm/val/accuracy >= 0 at every seed" in checked.stdout
    assert "FAIL  impossible: gold_reward(sft+ppo) >= 2 at every seed" in checked.stdout
    recipe["expect"] = recipe["expect"][:1]
    path.write_text(yaml.safe_dump(recipe))
    assert CliRunner().invoke(main, ["run", str(path), "--check", *sets]).exit_code == 0


def test_bad_seeds_are_one_line_errors(tmp_path: Path) -> None:
    result = run("--seeds", "4-0", "--set", f"output_root={tmp_path}")
    assert result.exit_code == 2 and "reversed" in result.stderr and "Traceback" not in result.stderr
    recipe = yaml.safe_load(DEFAULT.read_text())
    recipe["expect"] = [{"metrik": "gold_reward", "min": 0.1}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--set", f"output_root={tmp_path}"])
    assert result.exit_code == 2 and "expect[0]" in result.stderr and "metric" in result.stderr
