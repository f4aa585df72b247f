#!/usr/bin/env python
"""align SFT on the peers' bench work (`../shared/peers/README.md`): one JSON line.

    python bench/bench_sft.py --hidden 64 --layers 2 [--lora] [--epochs 1] [--profile]

The model, tokenizer and data are `trl_sft.py`'s, rebuilt by `bench/common.py` (in a child process) and saved with
save_pretrained; then `align.sft.train_sft` runs in this process with the peer's settings (batch 16,
max length 64, lr 1e-3, 1 epoch, fp32, 2 threads, no validation, no warmup, grad clip 1.0).

Timing: `train_time_sec` is align's own measure of its training loop (first batch to last
optimizer step; it excludes loading, like the peer's timer around `trainer.train()`, which
excludes building the trainer). `call_time_sec` is the whole `train_sft` call, loading and the
final save included, for transparency. `final_loss` is the mean training loss over the run, the
same quantity as the peer's `train_loss` (HF Trainer's run mean); `last_loss` is the last window's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets offline env and sys.path)
from common import Profiler, build_in_subprocess, emit, long_sft_data, peak_memory_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", action="store_true", help="LoRA r 8 alpha 16 on q_proj,v_proj (the PPO --peft adapter)")
    ap.add_argument("--seq-len", type=int, default=None, help="scaling: completions padded to this many tokens")
    ap.add_argument("--set", action="append", default=[], help="extra align config overrides key=value")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from align.config import SFTConfig, from_dict, parse_override, set_dotted
    from align.rundir import read_metrics
    from align.sft import train_sft

    root = Path(tempfile.mkdtemp(prefix="align_bench_sft_"))
    model_dir, data = build_in_subprocess("sft", root, args.hidden, args.layers, pairs=args.pairs, seed=args.seed)
    max_length = 64
    if args.seq_len:
        data, max_length = long_sft_data(root, args.seq_len, args.pairs, args.seed), args.seq_len
    raw = {
        "output_dir": str(root / "run"), "seed": args.seed,
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"enabled": args.lora, "r": 8, "alpha": 16, "target": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "val_fraction": 0.0, "max_length": max_length, "truncation": "truncate"},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1e-3, "warmup_steps": 0,
                  "max_grad_norm": 1.0, "mixed_precision": "no", "log_every": 4, "eval_every": 10**9,
                  "save_every": 10**9},
    }
    for item in args.set:
        set_dotted(raw, *parse_override(item))
    cfg = from_dict(SFTConfig, raw)
    cfg.validate()

    import accelerate  # noqa: F401  (the libraries align loads lazily, so the baseline holds them)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

    rss_before = peak_memory_mb()  # interpreter and libraries: what any training process pays first
    t0 = time.perf_counter()
    with Profiler(args.profile, args.profile_out):
        summary = train_sft(cfg)
    call_time = time.perf_counter() - t0
    rows = [r for r in read_metrics(root / "run" / "metrics.jsonl") if "train/loss" in r]
    # The peer's train_loss is the mean of per-step losses; every window here holds log_every steps.
    steps = [r["step"] for r in rows]
    widths = [s - p for s, p in zip(steps, [0] + steps[:-1])]
    run_mean = sum(r["train/loss"] * w for r, w in zip(rows, widths)) / max(1, sum(widths))
    dt = summary["train_time_sec"]
    samples = summary["steps"] * args.batch
    emit({"tool": "align", "bench": "sft", "hidden": args.hidden, "layers": args.layers,
          "mode": "lora" if args.lora else "full", "seq_len": args.seq_len or max_length,
          "samples_per_sec": samples / dt, "tokens_per_sec": summary["tokens_seen"] / dt,
          "peak_rss_mb": peak_memory_mb(), "rss_before_train_mb": rss_before, "final_loss": run_mean, "last_loss": rows[-1]["train/loss"],
          "train_time_sec": dt, "call_time_sec": call_time, "steps": summary["steps"], "samples": samples})


if __name__ == "__main__":
    main()
