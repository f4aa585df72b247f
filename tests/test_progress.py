"""Progress output where no bar can be drawn: a CI log (CI=true), output that is not a terminal, a
terminal of zero width. There the loops print whole lines (`PlainProgress`), never carriage
returns or an empty bar, and the TRL-driven DPO stage prints the same lines as the other stages
instead of TRL's bar and log dicts."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from align.runtime import PlainProgress, live_terminal, progress

REPO = Path(__file__).resolve().parents[1]


def test_plain_lines_every_tenth_and_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    bar = PlainProgress(total=20, initial=0, desc="sft")
    for step in range(20):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
        if step == 4:
            bar.write("  [step 5] a sample")
    bar.close()
    bar.close()  # closing twice prints nothing more
    out = capsys.readouterr()
    lines = out.err.splitlines()
    # the first step, then steps 2, 4, ..., 20 (each tenth of 20 steps)
    assert [line.split(",")[0] for line in lines] == [f"sft: step {n}/20 ({5 * n}%)" for n in [1, *range(2, 21, 2)]]
    assert lines[0].endswith("loss=1.0000") and lines[1].endswith("loss=0.5000")  # each with its step's values
    assert "elapsed" in lines[0] and "steps/s" in lines[0]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    assert "\r" not in out.err and out.out == "  [step 5] a sample\n"


def test_a_resumed_run_counts_from_its_step_and_a_quiet_stretch_still_prints(capsys: pytest.CaptureFixture[str],
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("align.runtime.time.perf_counter", lambda: now[0])
    bar = PlainProgress(total=1000, initial=500, desc="ppo", every_sec=60.0)
    for t in (1.0, 2.0, 70.0):  # the first step of this process; nothing new; a minute since the last line
        now[0] = t
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["ppo: step 501/1000 (50%)", "ppo: step 503/1000 (50%)"]
    assert lines[1].split(", ")[1:3] == ["0:01:10 elapsed", "0.04 steps/s"]


@pytest.mark.parametrize("env, tty, live", [
    ({"CI": "true"}, True, False),
    ({"COLUMNS": "0"}, True, False),
    ({}, False, False),
    ({"COLUMNS": "120"}, True, True),
])
def test_live_terminal(env: dict[str, str], tty: bool, live: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert live_terminal() is live
    bar = progress(10, 0, "sft", enabled=True)
    assert isinstance(bar, PlainProgress) is not live
    bar.close()


SCRIPT = """
from align.runtime import progress
bar = progress(5, 0, "sft", True)
for _ in range(5):
    bar.update(1)
    bar.set_postfix(loss="0.5000")
bar.close()
print("done")
"""


def run_in_terminal(columns: int, env: dict[str, str]) -> str:
    """SCRIPT with stdin, stdout and stderr on a pseudo-terminal `columns` wide; what it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "COLUMNS")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=slave, stdout=slave, stderr=slave,
                            env={**base, "PYTHONPATH": str(REPO), **env})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    os.close(master)
    return out.decode()


@pytest.mark.parametrize("columns, env", [(0, {}), (80, {"COLUMNS": "0"}), (80, {"CI": "true"})])
def test_zero_width_terminals_and_ci_get_plain_lines(columns: int, env: dict[str, str]) -> None:
    """tqdm draws nothing at all in a zero-width terminal; these get whole lines instead."""
    out = run_in_terminal(columns, env).replace("\r\n", "\n")
    lines = [line for line in out.splitlines() if line]
    assert [line.split(",")[0] for line in lines[:-1]] == [f"sft: step {n}/5 ({20 * n}%)" for n in range(1, 6)]
    assert lines[-1] == "done" and "\r" not in out and "\x1b" not in out


def test_a_wide_terminal_keeps_the_bar() -> None:
    out = run_in_terminal(100, {})
    assert "sft: 100%" in out and "5/5" in out


def test_dpo_prints_our_progress_lines_not_trl_bar_or_log_dicts(tmp_path: Path, tiny_model_dir: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from align.config import DPOStageConfig, from_dict
    from align.dpo import train_dpo
    from align.tasks.addition import build

    data = build(tmp_path / "data", seed=0, n_digits=1, n_sft=8, n_pref=32, n_prompts=4, n_eval=4)
    cfg: Any = from_dict(DPOStageConfig, {
        "output_dir": str(tmp_path / "dpo"), "seed": 0, "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(data["pref_train"]), "validation": str(data["pref_val"]), "max_length": 24},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 100, "eval_every": 2,
                  "mixed_precision": "no", "report_to": []}})
    cfg.validate()
    train_dpo(cfg)
    out = capfd.readouterr()
    progress_lines = [line for line in out.err.splitlines() if line.startswith("dpo: step")]
    # each step's line, then the last values (the final evaluation's) at the end
    assert [line.split(",")[0] for line in progress_lines] == ["dpo: step 1/2 (50%)", "dpo: step 2/2 (100%)",
                                                               "dpo: step 2/2 (100%)"]
    assert "loss=" in progress_lines[1] and "val=" in progress_lines[-1]
    assert "{'loss'" not in out.out + out.err and "\r" not in out.err  # neither TRL's log dicts nor its bar
    assert out.out.startswith("dpo: ")  # the stage's plan line, as every stage prints one
