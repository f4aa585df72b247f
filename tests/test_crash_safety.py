"""Crash safety, exact resume and the non-finite guards.

- A training process killed with SIGKILL at any moment, in particular in the middle of a
  checkpoint write (tests/crash_points.py cuts each phase of the write short), leaves every
  `checkpoints/step-N` complete and loadable, `latest` pointing at one of them, no final model
  or summary; and `--resume` then produces the same metrics and weights as an uninterrupted run.
- The same after kills at random moments of a run that checkpoints every step.
- Exact resume of the reward-model stage (SFT and PPO have theirs in test_sft.py and test_ppo.py).
- A NaN loss skips the update, is counted and reported; enough in a row stop the run (exit 2).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.checkpoint import load_trainer_state
from align.rundir import read_metrics

TESTS = Path(__file__).resolve().parent
TIMING_KEYS = {"samples_per_sec", "tokens_per_sec", "peak_memory_mb"}
SETTINGS = {"train.max_steps": 6, "train.save_every": 2, "train.keep_checkpoints": 1, "train.log_every": 1,
            "train.eval_every": 3}
# where each kill leaves `latest`: the checkpoint of step 4 is cut short, except by `pruning`
# (after `latest` moved) and `final-model` (after the last checkpoint, step 4)
POINTS = {"models-written": "step-0000002", "state-written": "step-0000002", "renamed": "step-0000002",
          "pruning": "step-0000004", "final-model": "step-0000004"}


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol


def check_after_kill(run: Path, latest: str | None = None) -> None:
    """Every step-N loads (weights and trainer state), `latest` names one of them, nothing looks finished."""
    from transformers import AutoModelForCausalLM

    ckpts = run / "checkpoints"
    pointed = (ckpts / "latest").read_text().strip()
    assert latest is None or pointed == latest
    assert (ckpts / pointed).is_dir()
    for step_dir in sorted(ckpts.glob("step-*")):
        assert AutoModelForCausalLM.from_pretrained(step_dir) is not None
        state = load_trainer_state(step_dir)
        assert state["state"]["step"] == int(step_dir.name.split("-")[1])
    assert not (run / "model").exists() and not (run / "summary.json").exists()


def resume(config: Path, kind: str = "sft") -> None:
    result = CliRunner().invoke(main, [kind, str(config), "--resume"])
    assert result.exit_code == 0, result.output + result.stderr




@pytest.fixture(scope="module")
def reference(make_sft_config: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.sft import train_sft

    out = tmp_path_factory.mktemp("reference") / "run"
    train_sft(make_sft_config(out, SETTINGS))
    return out


@pytest.fixture(scope="module")
def killed(make_sft_dict: Callable[..., dict], yaml_writer: Callable[[Path, dict], Path], align_cli: Callable[..., Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """One SFT run per crash point, each SIGKILLed there; two processes at a time."""
    runs = {}
    for point in POINTS:
        root = tmp_path_factory.mktemp(point)
        runs[point] = (root / "run", yaml_writer(root / "sft.yaml", make_sft_dict(root / "run", SETTINGS)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = pool.map(lambda p: align_cli(p, "4", "sft", str(runs[p][1]),
                                             module_args=[str(TESTS / "crash_points.py")]), POINTS)
        return {p: (*runs[p], proc) for p, proc in zip(POINTS, procs)}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_whole_and_resume_is_exact(
        point: str, killed: dict, reference: Path, load_weights: Callable[[Path], dict]) -> None:
    run, config, proc = killed[point]
    assert proc.returncode == -9, proc.stderr[-2000:]
    check_after_kill(run, POINTS[point])
    leftovers = {p.name for p in (run / "checkpoints").glob(".*-step-*")}
    assert leftovers == {"models-written": {".tmp-step-0000004"}, "state-written": {".tmp-step-0000004"},
                         "pruning": {".del-step-0000002"}}.get(point, set())
    if point == "renamed":  # step-4 is complete but `latest` never moved to it: the resume starts at 2
        assert (run / "checkpoints" / "step-0000004" / "trainer_state.pt").is_file()
    resume(config)
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(reference / "metrics.jsonl"))
    assert_same_weights(load_weights(run / "model"), load_weights(reference / "model"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_kills_at_random_moments_of_a_run_that_checkpoints_every_step(
        make_sft_dict: Callable[..., dict], make_sft_config: Callable[..., Any],
        yaml_writer: Callable[[Path, dict], Path], tmp_path: Path, load_weights: Callable[[Path], dict]) -> None:
    from align.sft import train_sft

    settings = {**SETTINGS, "train.max_steps": 30, "train.save_every": 1, "train.keep_checkpoints": 2,
                "train.eval_every": 10}
    train_sft(make_sft_config(tmp_path / "reference", settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    delays = [random.Random(attempt).uniform(0.0, 0.4) for attempt in range(3)]

    def run_and_kill(attempt: int) -> tuple[Path, Path]:
        run = tmp_path / f"run{attempt}"
        config = yaml_writer(tmp_path / f"sft{attempt}.yaml", make_sft_dict(run, settings))
        proc = subprocess.Popen([sys.executable, "-m", "align", "sft", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delays[attempt])  # then somewhere in the run: each step writes a checkpoint
        proc.kill()
        proc.wait()
        return run, config

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(run_and_kill, range(len(delays))))
    interrupted = [(run, config) for run, config in runs if not (run / "summary.json").exists()]
    assert interrupted, "every run finished before its kill landed"
    for run, config in interrupted:
        check_after_kill(run)
        resume(config)
        assert comparable(read_metrics(run / "metrics.jsonl")) == \
            comparable(read_metrics(tmp_path / "reference" / "metrics.jsonl"))
        assert_same_weights(load_weights(run / "model"), load_weights(tmp_path / "reference" / "model"))


# ----------------------------------------------------------------------------------------------
# Exact resume of the reward model


@pytest.mark.slow
def test_reward_model_resumed_after_sigkill_matches_an_uninterrupted_run(
        tiny_model_dir: Path, tmp_path: Path, yaml_writer: Callable[[Path, dict], Path], align_cli: Callable[..., Any],
        load_weights: Callable[[Path], dict]) -> None:
    from align.config import RMConfig, from_dict
    from align.rm import train_rm

    rng = random.Random(0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{rng.randint(0, 99)}?", "chosen": "a" * rng.randint(1, 4),
                                         "rejected": "b" * rng.randint(1, 4)}) + "\n" for _ in range(96)))

    def config(out: Path) -> dict[str, Any]:
        return {"output_dir": str(out), "seed": 0, "model": {"path": str(tiny_model_dir)},
                "data": {"train": str(pairs), "val_fraction": 0.2, "max_length": 16},
                "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4,
                          "log_every": 1, "save_every": 5, "mixed_precision": "no"}}

    reference = tmp_path / "reference"
    train_rm(from_dict(RMConfig, config(reference)))
    run = tmp_path / "run"
    path = yaml_writer(tmp_path / "rm.yaml", config(run))
    proc = align_cli("7", "rm", str(path), module_args=[str(TESTS / "kill_after_step.py")])
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000005"
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 7
    resume(path, "rm")
    rows, want = read_metrics(run / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    assert comparable(rows) == comparable(want)
    assert any("val/accuracy" in r for r in rows)
    assert_same_weights(load_weights(run / "model"), load_weights(reference / "model"))


# ----------------------------------------------------------------------------------------------
# Non-finite guards


def nan_at(real: Callable[..., Any], calls: set[int] | Callable[[int], bool]) -> Callable[..., Any]:
    """Wrap a function returning (loss, ...): the loss is NaN on the chosen calls (1-based)."""
    count = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        loss, *rest = real(*args, **kwargs)
        bad = count[0] in calls if isinstance(calls, set) else calls(count[0])
        return (loss * float("nan") if bad else loss, *rest)

    return wrapped


def test_a_nan_loss_skips_the_update_and_is_reported(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                     yaml_writer: Callable[[Path, dict], Path],
                                                     load_weights: Callable[[Path], dict],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import align.sft

    # no validation, so terms() runs once per step: steps 3 and 4 get a NaN loss
    monkeypatch.setattr(align.sft, "sft_terms", nan_at(align.sft.sft_terms, {3, 4}))
    run = tmp_path / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, {
        "train.max_steps": 6, "train.save_every": 5, "train.log_every": 1, "data.validation": None,
        "data.val_fraction": 0.0, "train.max_nonfinite_steps": 3}))
    result = CliRunner().invoke(main, ["sft", str(config)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "sft: step 3: non-finite loss or gradient, update skipped (1 in a row)" in result.stdout
    assert "sft: step 4: non-finite loss or gradient, update skipped (2 in a row)" in result.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["train/nonfinite_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(math.isfinite(r["train/loss"]) for r in rows if r["step"] not in (3, 4))
    # the skipped steps made no optimizer update: AdamW counted 5 - 2 steps by the step-5 checkpoint
    optimizer = load_trainer_state(run / "checkpoints" / "step-0000005")["optimizer"]
    assert {float(s["step"]) for s in optimizer["state"].values()} == {3.0}
    assert all(torch.isfinite(w).all() for w in load_weights(run / "model").values())


def test_nan_losses_in_a_row_stop_the_run_with_one_line(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                        yaml_writer: Callable[[Path, dict], Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import align.sft

    monkeypatch.setattr(align.sft, "sft_terms", nan_at(align.sft.sft_terms, lambda call: call >= 2))
    run = tmp_path / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, {
        "train.max_steps": 10, "data.validation": None, "data.val_fraction": 0.0, "train.max_nonfinite_steps": 3}))
    result = CliRunner().invoke(main, ["sft", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: stopping: 3 steps in a row with a non-finite loss or gradient")
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    assert not (run / "model").exists() and not (run / "summary.json").exists()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(4) for b in range(4)))
    return path


def ppo_yaml(path: Path, out: Path, model: Path, prompts: Path, **ppo: Any) -> Path:
    import yaml

    data = {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "reward": {"function": "toy_rewards:fraction_of_sevens"},
            "data": {"train": str(prompts), "max_length": 16},
            "ppo": {"total_episodes": 32, "rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8,
                    "ppo_epochs": 1, "response_length": 4, "mixed_precision": "no", "eval_every": 1000,
                    "sample_every": 1000, "save_every": 1000, **ppo}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_ppo_skips_an_update_with_a_nan_loss(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path,
                                             load_weights: Callable[[Path], dict],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import align.ppo

    # one minibatch per step: the policy loss is NaN in steps 2 and 3
    monkeypatch.setattr(align.ppo, "clipped_policy_loss", nan_at(align.ppo.clipped_policy_loss, {2, 3}))
    config = ppo_yaml(tmp_path / "ppo.yaml", tmp_path / "run", tiny_model_dir, prompts_file)
    result = CliRunner().invoke(main, ["ppo", str(config)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "ppo: step 2: 1 update(s) with a non-finite loss or gradient skipped (1 step(s) in a row)" in result.stdout
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["guard/nonfinite_steps"] for r in rows] == [0, 1, 2, 2]
    assert all(torch.isfinite(w).all() for w in load_weights(tmp_path / "run" / "model").values())


def test_ppo_stops_after_nan_losses_in_a_row(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import align.ppo

    monkeypatch.setattr(align.ppo, "clipped_policy_loss", nan_at(align.ppo.clipped_policy_loss, lambda call: True))
    config = ppo_yaml(tmp_path / "ppo.yaml", tmp_path / "run", tiny_model_dir, prompts_file, max_nonfinite_steps=2)
    result = CliRunner().invoke(main, ["ppo", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: stopping: 2 steps in a row with a non-finite loss or gradient")
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "summary.json").exists()
