"""SFT in two CPU processes (DDP over gloo, launched with torchrun) against one process with the
same global batch: 2 processes x batch 4 == 1 process x batch 8, in weights and in every logged
loss; both ranks end with identical weights; the process group is gone before the process exits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from align.rundir import read_metrics
from align.sft import train_sft

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"train.max_steps": 12, "train.eval_every": 4, "train.log_every": 1, "train.save_every": 6}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(
        tmp_path: Path, make_sft_config: Callable[..., Any], make_sft_dict: Callable[..., dict],
        yaml_writer: Callable[[Path, dict], Path], align_cli: Callable[..., Any],
        load_weights: Callable[[Path], dict[str, torch.Tensor]], tiny_model_dir: Path) -> None:
    one = tmp_path / "one"
    train_sft(make_sft_config(one, {**SETTINGS, "train.batch_size": 8}))

    two, ranks = tmp_path / "two", tmp_path / "ranks"
    config = yaml_writer(tmp_path / "ddp.yaml", make_sft_dict(two, {**SETTINGS, "train.batch_size": 4}))
    proc = align_cli(str(ranks), "sft", str(config), module_args=[
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "ddp_worker.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "12 steps of 8" in proc.stdout and "2 process(es)" in proc.stdout, proc.stdout

    # Each rank: two processes, the process group destroyed by the time the command returned.
    for rank in (0, 1):
        info = json.loads((ranks / f"rank-{rank}.json").read_text())
        assert info == {"world": 2, "process_group_alive": False}

    # Both ranks hold the same weights, and rank 0 saved them.
    rank0, rank1 = (load_weights_file(ranks / f"rank-{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights diverged"
    saved = load_weights(two / "model")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)

    # The same training as one process: weights to float tolerance, and every logged loss.
    single = load_weights(one / "model")
    init = load_weights(tiny_model_dir)
    assert max((single[k] - init[k]).abs().max().item() for k in init) > 1e-2, "training changed nothing"
    worst = max((saved[k] - single[k]).abs().max().item() for k in single)
    assert worst < 2e-5, f"2-process weights differ from 1-process by up to {worst:g}"
    rows_two, rows_one = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]  # one writer: no duplicate rows
    for a, b in zip(rows_two, rows_one):
        for key in ("train/loss", "train/token_accuracy", "train/grad_norm", "val/loss", "val/token_accuracy", "lr"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["examples"] == 240


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
