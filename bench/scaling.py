#!/usr/bin/env python
"""Scaling curves and the memory table of docs/performance.md, and its plot.

    python bench/scaling.py [--threads 2] [--sizes 64x2,256x4] [--memory-sizes 64x2,256x4,1024x8]
    python bench/scaling.py --replot   # redraw docs/performance.png from bench/results/scaling.jsonl

- PPO step time vs response length (16, 32, 64, 128) at rollout batch 8, and vs rollout batch
  (8, 16, 32, 64) at response length 16; full mode, 2 PPO steps each (`--ppo-steps`). Responses
  run to the full length unless every row sampled EOS; with these untrained models EOS is rare
  (about 1 in 260 tokens), so the length is the requested one.
- SFT throughput vs sequence length (32, 64, 128, 256 tokens per example), padding-free.
- Peak RSS of SFT (full, LoRA) and PPO (full, LoRA) on the same model, per size.
Each point is one run of `bench/bench_{sft,ppo}.py` in its own process; rows go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def bench(script: str, *flags: str) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(HERE / script), *flags], check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def measure(args: argparse.Namespace, emit: Any) -> None:
    th = ["--threads", str(args.threads)]
    for size in args.sizes.split(","):
        h, l = size.split("x")
        model = ["--hidden", h, "--layers", l, *th]
        for r in (16, 32, 64, 128):
            emit({"curve": "ppo_resp_len", "x": r, **bench("bench_ppo.py", *model, "--resp-len", str(r),
                                                            "--steps", str(args.ppo_steps))})
        for b in (8, 16, 32, 64):
            emit({"curve": "ppo_batch", "x": b, **bench("bench_ppo.py", *model, "--batch", str(b), "--num-prompts",
                                                         str(max(64, b * args.ppo_steps)), "--steps", str(args.ppo_steps))})
        for t in (32, 64, 128, 256):
            emit({"curve": "sft_seq_len", "x": t, **bench("bench_sft.py", *model, "--seq-len", str(t),
                                                           "--set", "train.padding_free=true")})
    for size in args.memory_sizes.split(","):
        h, l = size.split("x")
        model = ["--hidden", h, "--layers", l, *th]
        big = int(h) >= 1024  # fewer steps: memory peaks within the first steps
        sft_steps = ["--set", "train.max_steps=4"] if big else []
        ppo_steps = ["--steps", "1"] if big else []
        emit({"curve": "memory", "x": size, **bench("bench_sft.py", *model, *sft_steps)})
        emit({"curve": "memory", "x": size, **bench("bench_sft.py", *model, "--lora", *sft_steps)})
        emit({"curve": "memory", "x": size, **bench("bench_ppo.py", *model, *ppo_steps)})
        emit({"curve": "memory", "x": size, **bench("bench_ppo.py", *model, "--peft", *ppo_steps)})


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    sizes = sorted({(r["hidden"], r["layers"]) for r in rows if r["curve"] != "memory"})
    for ax, curve, ylabel, title in (
            (axes[0], "ppo_resp_len", "s per PPO step", "PPO step time vs response length (batch 8)"),
            (axes[1], "ppo_batch", "s per PPO step", "PPO step time vs rollout batch (length 16)"),
            (axes[2], "sft_seq_len", "tokens / s", "SFT throughput vs sequence length (padding-free)")):
        for h, l in sizes:
            pts = sorted((r["x"], r) for r in rows if r["curve"] == curve and (r["hidden"], r["layers"]) == (h, l))
            if not pts:
                continue
            xs = [x for x, _ in pts]
            if curve == "sft_seq_len":
                ax.plot(xs, [r["tokens_per_sec"] for _, r in pts], "o-", label=f"H={h} L={l}")
            else:
                line, = ax.plot(xs, [r["step_time_sec"] for _, r in pts], "o-", label=f"H={h} L={l} total")
                ax.plot(xs, [r["rollout_time_sec"] for _, r in pts], "s--", color=line.get_color(), alpha=0.6,
                        label=f"H={h} L={l} rollout")
                # linear reference through the first point
                ax.plot(xs, [pts[0][1]["step_time_sec"] * x / xs[0] for x in xs], ":", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["x"] for r in rows if r["curve"] == curve}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    mem = [r for r in rows if r["curve"] == "memory"]
    labels = list(dict.fromkeys(r["x"] for r in mem))
    kinds = [("sft", "full"), ("sft", "lora"), ("ppo", "full"), ("ppo", "lora")]
    width = 0.2
    for k, (bench, mode) in enumerate(kinds):
        vals = [next((r["peak_rss_mb"] - r["rss_before_train_mb"] for r in mem
                      if r["x"] == lab and r["bench"] == bench and r["mode"] == mode), 0) for lab in labels]
        axes[3].bar([i + (k - 1.5) * width for i in range(len(labels))], vals, width, label=f"{bench.upper()} {mode}")
    axes[3].set_xticks(range(len(labels)), [f"H x L = {lab}" for lab in labels])
    axes[3].set_yscale("log")
    axes[3].set_ylabel("peak RSS - RSS before training (MB)")
    axes[3].set_title("Memory added by training, same model", fontsize=9)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="64x2,256x4")
    ap.add_argument("--memory-sizes", default="64x2,256x4,1024x8")
    ap.add_argument("--ppo-steps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.jsonl"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "performance.png"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.replot:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")

        def emit(row: dict[str, Any]) -> None:
            row["load_avg_1m"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

        measure(args, emit)
    plot([json.loads(line) for line in out.read_text().splitlines() if line.strip()], Path(args.plot))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
