"""No silent wrong runs: one run per directory (two real processes), resume that verifies its
checkpoint and falls back, changes a checkpoint would override refused even with --force, input
files hashed, a full disk reported, non-finite and out-of-range config values rejected."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from align.cli import main
from align.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"train.max_steps": 6, "train.save_every": 2, "train.keep_checkpoints": 3, "train.log_every": 1,
            "train.eval_every": 100}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert result.exit_code == 2, result.output + result.stderr
    assert "Traceback" not in result.stderr and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


@pytest.fixture
def interrupted(make_sft_config: Callable[..., Any], make_sft_dict: Callable[..., dict], tmp_path: Path,
                yaml_writer: Callable[[Path, dict], Path]) -> tuple[Path, Path, list[dict]]:
    """A finished 6-step run with checkpoints at steps 2 and 4, then cut back to 'killed after the
    step-4 checkpoint'; returns (run, its config file, the uninterrupted run's metrics)."""
    from align.sft import train_sft

    run = tmp_path / "run"
    train_sft(make_sft_config(run, SETTINGS))
    reference = read_metrics(run / "metrics.jsonl")
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    return run, yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, SETTINGS)), reference


def test_resume_falls_back_to_the_newest_intact_checkpoint(interrupted: tuple[Path, Path, list[dict]]) -> None:
    run, config, reference = interrupted
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000004"
    state = ckpts / "step-0000004" / "trainer_state.pt"
    state.write_bytes(b"x" * state.stat().st_size)  # same name and size, damaged
    result = invoke("sft", str(config), "--resume")
    assert result.exit_code == 0, result.output + result.stderr
    assert "step-0000004: trainer_state.pt does not load" in result.stdout
    assert "resuming from step-0000002 instead" in result.stdout
    resumed = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(reference, resumed):
        assert b.get("train/loss") == pytest.approx(a.get("train/loss"), rel=1e-5), a["step"]


def test_a_truncated_weights_file_is_caught_by_the_manifest(interrupted: tuple[Path, Path, list[dict]]) -> None:
    run, config, _ = interrupted
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = invoke("sft", str(config), "--resume")
    assert result.exit_code == 0, result.output + result.stderr
    assert "step-0000004: model.safetensors is 100 bytes" in result.stdout and "from step-0000002" in result.stdout


def test_no_intact_checkpoint_is_an_error_not_a_restart(interrupted: tuple[Path, Path, list[dict]]) -> None:
    run, config, _ = interrupted
    for step in ("step-0000002", "step-0000004"):
        (run / "checkpoints" / step / "trainer_state.pt").unlink()
    line = one_error_line(invoke("sft", str(config), "--resume"))
    assert "no intact checkpoint to resume from" in line and "trainer_state.pt is missing" in line
    assert not (run / "model").exists() and not (run / "summary.json").exists()


def test_force_refuses_a_change_the_checkpoint_would_override(interrupted: tuple[Path, Path, list[dict]]) -> None:
    run, config, _ = interrupted
    line = one_error_line(invoke("sft", str(config), "--resume", "--force", "--set", "train.lr=0.5"))
    assert "changed train.lr" in line and "even with --force" in line
    assert "lr: 0.5" not in (run / "config.yaml").read_text()
    # a change the resumed run does apply is allowed with --force
    result = invoke("sft", str(config), "--resume", "--force", "--set", "train.log_every=2")
    assert result.exit_code == 0, result.output + result.stderr


def test_a_rewritten_data_file_is_noticed_on_resume(interrupted: tuple[Path, Path, list[dict]]) -> None:
    import yaml

    run, config, _ = interrupted
    data = Path(yaml.safe_load(config.read_text())["data"]["train"])
    backup = data.read_bytes()
    try:
        data.write_bytes(backup.replace(b'"response": "', b'"response": " ', 1))
        line = one_error_line(invoke("sft", str(config), "--resume"))
        assert f"{data}: content changed since the run started" in line and "--force" in line
    finally:
        data.write_bytes(backup)


def test_disk_full_during_a_checkpoint_says_so_and_what_is_intact(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                                   yaml_writer: Callable[[Path, dict], Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import align.modeling

    real, calls = align.modeling.save_model, [0]

    def full_on_second_checkpoint(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(align.modeling, "save_model", full_on_second_checkpoint)
    run = tmp_path / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, SETTINGS))
    line = one_error_line(invoke("sft", str(config)))
    assert "disk full while writing checkpoint step-0000004" in line and "step-0000002, is intact" in line
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "summary.json").exists()


def launch(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "align", "sft", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_lock(run: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not ((run / ".lock").is_file() and (run / ".lock").read_text().startswith("pid")):
        assert proc.poll() is None and time.time() < deadline, "the first run never took its lock"
        time.sleep(0.05)


def test_two_processes_cannot_share_a_run_directory(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                    yaml_writer: Callable[[Path, dict], Path]) -> None:
    run = tmp_path / "run"
    # long enough that the first run is still training when the second one looks (it is killed after)
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, {**SETTINGS, "train.max_steps": 100_000,
                                                                    "train.save_every": 100_000}))
    first = launch(config)
    try:
        wait_for_lock(run, first)
        second = launch(config)
        _, err = second.communicate(timeout=120)
        assert first.poll() is None, "the first run ended before the second one looked"
        assert second.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [f"error: output_dir '{run}' is in use by pid {first.pid} on {os.uname().nodename}; "
                         "wait for that run to end or choose another directory"]
        assert (run / "config.yaml").is_file() and not (run / "summary.json").exists()
    finally:
        first.kill()
        first.wait()


def test_a_killed_runs_lock_is_released(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                        yaml_writer: Callable[[Path, dict], Path]) -> None:
    run = tmp_path / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, {**SETTINGS, "train.max_steps": 100_000,
                                                                    "train.save_every": 100_000}))
    first = launch(config)
    wait_for_lock(run, first)
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (run / ".lock").is_file()  # the file stays; the lock does not
    result = invoke("sft", str(config), "--dry-run")  # takes no lock: check the lock directly
    from align.rundir import RunDir, lock_run, release_locks

    lock_run(RunDir(run))  # would raise "in use by" if the dead process still held it
    release_locks()
    assert result.exit_code == 0, result.output + result.stderr


@pytest.mark.parametrize("key, value, message", [
    ("train.lr", ".inf", "config key 'train.lr' must be a finite number"),
    ("train.weight_decay", ".nan", "config key 'train.weight_decay' must be a finite number"),
    ("train.epochs", ".inf", "config key 'train.epochs' must be a finite number"),
    ("seed", "-1", "config key 'seed' must be >= 0"),
    ("seed", "4294967296", "config key 'seed' must be <= 4294967295"),
])
def test_non_finite_and_out_of_range_values_are_config_errors_caught_by_dry_run(
        key: str, value: str, message: str, make_sft_dict: Callable[..., dict], tmp_path: Path,
        yaml_writer: Callable[[Path, dict], Path]) -> None:
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tmp_path / "run"))
    line = one_error_line(invoke("sft", str(config), "--dry-run", "--set", f"{key}={value}"))
    assert message in line
    assert not (tmp_path / "run").exists()


def test_summary_json_is_strict_json(make_sft_config: Callable[..., Any], tmp_path: Path) -> None:
    """No validation set: the best validation loss is unknown, written as null, never Infinity."""
    import json

    from align.sft import train_sft

    train_sft(make_sft_config(tmp_path / "run", {"train.max_steps": 2, "train.warmup_steps": 0, "data.validation": None,
                                                 "data.val_fraction": 0.0}))
    text = (tmp_path / "run" / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))[
        "best_val_loss"] is None


def test_output_dir_equal_to_the_input_model_is_refused(make_sft_dict: Callable[..., dict], tiny_model_dir: Path,
                                                         tmp_path: Path, yaml_writer: Callable[[Path, dict], Path]) -> None:
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tiny_model_dir))
    for extra in ((), ("--dry-run",)):
        line = one_error_line(invoke("sft", str(config), *extra))
        assert line == (f"error: output_dir '{tiny_model_dir}' is the directory the run reads its model from "
                        "(model.path); choose another output_dir")
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before


def test_tensorboard_events_after_the_resumed_checkpoint_are_purged(interrupted: tuple[Path, Path, list[dict]]) -> None:
    """The resumed writer starts with purge_step = checkpoint step + 1: TensorBoard drops the
    events of steps 5 and 6 logged before the kill, so each step has one value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, config, _ = interrupted
    assert invoke("sft", str(config), "--resume").exit_code == 0
    acc = EventAccumulator(str(run / "tensorboard" / "align"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_section_key_at_the_top_level_suggests_its_section(make_sft_dict: Callable[..., dict], tmp_path: Path,
                                                             yaml_writer: Callable[[Path, dict], Path]) -> None:
    """`lr` at the top level means `train.lr`, not the nearest top-level name (`lora`)."""
    data = make_sft_dict(tmp_path / "run")
    data["lr"] = 0.1
    line = one_error_line(invoke("sft", str(yaml_writer(tmp_path / "sft.yaml", data)), "--dry-run"))
    assert line == "error: unknown config key 'lr'; did you mean 'train.lr'?"


def test_a_killed_run_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before(
        make_sft_dict: Callable[..., dict], tmp_path: Path, yaml_writer: Callable[[Path, dict], Path],
        align_cli: Callable[..., Any]) -> None:
    """A real process killed (SIGKILL) after step 5, checkpoints at 2 and 4; step 4's trainer state
    then damaged on disk: the resumed process says so, continues from step 2, and finishes."""
    run = tmp_path / "run"
    config = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(run, SETTINGS))
    killed = align_cli("5", "sft", str(config), module_args=[str(REPO / "tests" / "kill_after_step.py")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    state = run / "checkpoints" / "step-0000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resumed = align_cli("sft", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-0000004: trainer_state.pt is" in resumed.stdout and "resuming from step-0000002 instead" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
