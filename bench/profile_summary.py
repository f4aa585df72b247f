#!/usr/bin/env python
"""Where a profiled run's time goes, by category, from cProfile dumps (align's `--profile-out`, or
`python -m cProfile -o FILE` around a peer script):

    python bench/profile_summary.py /tmp/align_ppo.prof /tmp/trl_ppo.prof

Categories are summed own time ("tottime") of the torch kernels behind them, so they do not
overlap; `train` is the cumulative time of the training call (`train`, `train_ppo`, `train_sft`).
"""

from __future__ import annotations

import pstats
import sys

CATEGORIES = {
    "backward (autograd engine)": lambda f: "run_backward" in f,
    "linear layers (forward)": lambda f: "torch._C._nn.linear" in f,
    "attention (sdpa forward)": lambda f: "scaled_dot_product_attention" in f,
    "optimizer kernels": lambda f: "adam" in f.lower() or "_foreach_" in f,
}


def summarize(path: str) -> dict[str, float]:
    stats = pstats.Stats(path).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    train = max((v[3] for k, v in stats.items() if k[2] in ("train", "train_ppo", "train_sft")), default=0.0)
    gen = max((v[3] for k, v in stats.items() if k[2] == "generate" and "generation" in k[0]), default=0.0)
    out = {"train call (cumulative)": train, "generate (cumulative)": gen}
    for name, pred in CATEGORIES.items():
        out[name] = sum(v[2] for k, v in stats.items() if pred(f"{k[0]}:{k[2]}"))
    named = sum(out[n] for n in CATEGORIES)
    out["everything else (python, small ops)"] = train - named - 0.0
    return out


def main() -> None:
    rows = {p: summarize(p) for p in sys.argv[1:]}
    keys = list(next(iter(rows.values())))
    print("| category | " + " | ".join(rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.2f} s ({100 * r[k] / max(r['train call (cumulative)'], 1e-9):.0f}%)"
                                       for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
