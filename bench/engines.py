#!/usr/bin/env python
"""The two rollout engines side by side (`rollout.engine: hf | vllm`): rollout tokens/s, and PPO and
GRPO episodes/s end to end. Run it with the vLLM environment's python (docs/scaling.md):

    .venvs/vllm/bin/python bench/engines.py [--runs 3] [--threads 1] [--sizes 512x8,256x4]
        [--benches rollout,ppo,grpo]

For each size: `bench_rollout.py` once (it alternates hf and vllm `--runs` times in one process and
reports medians), then for PPO and GRPO `bench_ppo.py` (the peers' work, `--method grpo` for GRPO)
with `--set rollout.engine=hf` and `=vllm`, `--runs` times each, alternating with the order swapped
every round, each run its own process. Prints one JSON line per run and per (size, bench) the
medians and the ratio vllm / hf; everything is appended to --out (default bench/results/engines.jsonl).
episodes/s is the loop's own (`train_time_sec`: first rollout to last update, weight syncs
included, the engine's start excluded; `call_time_sec` includes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = subprocess.run([sys.executable, *args, "--threads", str(threads)], cwd=HERE, env=env, check=True,
                         capture_output=True, text=True, timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="512x8,256x4")
    ap.add_argument("--benches", default="rollout,ppo,grpo")
    ap.add_argument("--out", default=str(HERE / "results" / "engines.jsonl"))
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    benches = args.benches.split(",")
    with open(args.out, "a") as log:
        def record(row: dict) -> None:
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()

        for size in args.sizes.split(","):
            hidden, layers = size.split("x")
            shape = ["--hidden", hidden, "--layers", layers]
            if "rollout" in benches:
                record(run(["bench_rollout.py", *shape, "--runs", str(args.runs)], args.threads))
            for bench in ("ppo", "grpo"):
                if bench not in benches:
                    continue
                rows: dict[str, list[dict]] = {"hf": [], "vllm": []}
                for i in range(args.runs):
                    for engine in (("hf", "vllm") if i % 2 == 0 else ("vllm", "hf")):
                        row = run(["bench_ppo.py", *shape, "--method", bench, "--set", f"rollout.engine={engine}"],
                                  args.threads)
                        row["engine"] = engine
                        rows[engine].append(row)
                        record(row)
                med = {e: {k: statistics.median(r[k] for r in rs) for k in
                           ("episodes_per_sec", "step_time_sec", "rollout_time_sec", "update_time_sec",
                            "weight_sync_sec", "call_time_sec")} for e, rs in rows.items()}
                record({"summary": bench, "hidden": int(hidden), "layers": int(layers), "runs": args.runs,
                        "threads": args.threads, "hf": med["hf"], "vllm": med["vllm"],
                        "ratio": med["vllm"]["episodes_per_sec"] / med["hf"]["episodes_per_sec"]})


if __name__ == "__main__":
    main()
