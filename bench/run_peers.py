#!/usr/bin/env python
"""align beside TRL on the same work, in one invocation: medians of N runs each, and the ratios.

    python bench/run_peers.py [--runs 3] [--threads 2] [--sizes 64x2,256x4] [--benches sft,ppo-full,ppo-lora,ppo-shared,grpo]

1. Builds the peers' environments with `../shared/peers/setup.sh` (PEERS_VENV_DIR=bench/.venvs:
   trl 1.16.0 for SFT, trl 1.12.0 for PPO, the last release with PPOTrainer); skip with --no-setup.
2. For every size and bench, runs align (`bench/bench_*.py`) and the TRL peer alternately, N times
   each, the order swapped every round so a drift in machine load hits both alike. Each run is its
   own process; its peak RSS is read from `os.wait4` (that child's own rusage, MB).
3. Prints one JSON line per run, one per (size, bench) with medians and ratios (align / TRL:
   above 1 means align is faster, or uses more memory), then a table. Everything is also appended
   to --out (default bench/results/peers.jsonl).

Throughput is each program's own measure around its training call: the peers time
`trainer.train()`, align its training loop (`train_time_sec`); both exclude model building.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = Path(os.environ.get("ALIGN_PEERS_DIR", REPO.parent / "shared" / "peers"))
VENVS = HERE / ".venvs"

BENCHES = {
    # name: (align script and flags, peer venv, peer script and flags, throughput key, quality key)
    "sft": (["bench_sft.py"], ".venv-trl-sft", ["trl_sft.py"], "samples_per_sec", "final_loss"),
    "sft-padded": (["bench_sft.py", "--set", "train.padding_free=false"], ".venv-trl-sft", ["trl_sft.py"],
                   "samples_per_sec", "final_loss"),
    "ppo-full": (["bench_ppo.py"], ".venv-trl-ppo", ["trl_ppo.py"], "episodes_per_sec", "final_score"),
    "ppo-lora": (["bench_ppo.py", "--peft"], ".venv-trl-ppo", ["trl_ppo.py", "--peft"], "episodes_per_sec",
                 "final_score"),
    # critic.share_actor: a value head on the actor's trunk, against the same TRL PPO peer
    "ppo-shared": (["bench_ppo.py", "--share-actor"], ".venv-trl-ppo", ["trl_ppo.py"], "episodes_per_sec",
                   "final_score"),
    # GRPO: the peer is bench/trl_grpo.py (TRL 1.16's GRPOTrainer), run in the trl 1.16 environment
    "grpo": (["bench_ppo.py", "--method", "grpo"], ".venv-trl-sft", ["trl_grpo.py"], "episodes_per_sec",
             "final_score"),
}


def setup() -> None:
    env = {**os.environ, "PEERS_VENV_DIR": str(VENVS)}
    VENVS.mkdir(exist_ok=True)
    subprocess.run(["bash", str(PEERS / "setup.sh")], env=env, check=True)


def run(cmd: list[str], timeout: float) -> tuple[str, float, float]:
    """Run `cmd`; (stdout + stderr, peak RSS in MB of that process, wall seconds)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out_chunks = []
    deadline = t0 + timeout
    assert proc.stdout is not None
    for line in proc.stdout:  # drain as it goes, so a chatty child never blocks on a full pipe
        out_chunks.append(line)
        if time.perf_counter() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = "".join(out_chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024, time.perf_counter() - t0


def parse_align(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("{") and '"tool": "align"' in line:
            return json.loads(line)
    raise RuntimeError(f"no JSON line in align's output:\n{out[-2000:]}")


def parse_trl(out: str, bench: str) -> dict[str, Any]:
    m = re.search(r"RESULT trl_(\w+): (.*)", out)
    if not m:
        raise RuntimeError(f"no RESULT line in the peer's output:\n{out[-2000:]}")
    fields = dict(re.findall(r"(\w+)=([-\d.e+]+)s?\b", m.group(2)))
    row: dict[str, Any] = {"tool": "trl", "train_time_sec": float(fields["train_time"].rstrip("s"))}
    if bench == "sft":
        row["samples_per_sec"] = float(fields["samples_per_sec"])
        row["final_loss"] = float(fields["final_train_loss"])
    else:
        row["episodes_per_sec"] = float(fields["episodes_per_sec"])
        steps = re.findall(r"\[step \d+\].*?objective/scores=([-\d.e+]+)", out)
        row["final_score"] = float(fields["final_score"]) if "final_score" in fields else (
            float(steps[-1]) if steps else None)
    return row


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="64x2,256x4", help="hidden x layers, comma separated")
    ap.add_argument("--benches", default="sft,sft-padded,ppo-full,ppo-lora",
                    help="sft: align's default (padding-free where the model allows); sft-padded: train.padding_free=false")
    ap.add_argument("--align-args", default="", help="extra flags for the align benches, e.g. '--set train.padding_free=true'")
    ap.add_argument("--no-setup", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "results" / "peers.jsonl"))
    args = ap.parse_args()

    if not args.no_setup:
        setup()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(out_path, "a")

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    summaries = []
    for size in args.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        common = ["--hidden", str(hidden), "--layers", str(layers), "--threads", str(args.threads)]
        for bench in args.benches.split(","):
            a_script, venv, p_script, speed_key, quality_key = BENCHES[bench]
            extra = args.align_args.split()
            align_cmd = [sys.executable, str(HERE / a_script[0]), *a_script[1:], *common, *extra]
            peer = HERE / p_script[0] if (HERE / p_script[0]).is_file() else PEERS / p_script[0]
            trl_cmd = [str(VENVS / venv / "bin" / "python"), str(peer), *p_script[1:], *common]
            rows: dict[str, list[dict[str, Any]]] = {"align": [], "trl": []}
            for i in range(args.runs):
                order = ("align", "trl") if i % 2 == 0 else ("trl", "align")
                for tool in order:
                    load = load_average()
                    out, rss, wall = run(align_cmd if tool == "align" else trl_cmd, args.timeout)
                    row = parse_align(out) if tool == "align" else parse_trl(out, "sft" if bench.startswith("sft") else "ppo")
                    row.update({"tool": tool, "bench": bench, "hidden": hidden, "layers": layers, "run": i,
                                "threads": args.threads, "process_peak_rss_mb": rss, "process_wall_sec": wall,
                                "load_avg_1m_before": load})
                    rows[tool].append(row)
                    emit(row)
            med = {t: {k: statistics.median(r[k] for r in rs) for k in (speed_key, "process_peak_rss_mb")}
                   for t, rs in rows.items()}
            quality = {t: statistics.median(r[quality_key] for r in rs if r.get(quality_key) is not None)
                       for t, rs in rows.items()}
            summary = {
                "summary": True, "bench": bench, "hidden": hidden, "layers": layers, "runs": args.runs,
                "threads": args.threads, "metric": speed_key,
                "align_median": med["align"][speed_key], "trl_median": med["trl"][speed_key],
                "speed_ratio": med["align"][speed_key] / med["trl"][speed_key],
                "align_peak_rss_mb": med["align"]["process_peak_rss_mb"],
                "trl_peak_rss_mb": med["trl"]["process_peak_rss_mb"],
                "memory_ratio": med["align"]["process_peak_rss_mb"] / med["trl"]["process_peak_rss_mb"],
                f"align_{quality_key}": quality["align"], f"trl_{quality_key}": quality["trl"],
                "load_avg_range": [min(r["load_avg_1m_before"] for rs in rows.values() for r in rs),
                                   max(r["load_avg_1m_before"] for rs in rows.values() for r in rs)],
            }
            if bench.startswith("sft"):
                summary["loss_rel_diff"] = abs(quality["align"] - quality["trl"]) / quality["trl"]
            summaries.append(summary)
            emit(summary)

    print()
    print(f"| bench | size | metric | align | TRL | align/TRL | RSS align MB | RSS TRL MB | quality align / TRL | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        q = "final_loss" if s["bench"].startswith("sft") else "final_score"
        print(f"| {s['bench']} | H={s['hidden']} L={s['layers']} | {s['metric']} | {s['align_median']:.2f} | "
              f"{s['trl_median']:.2f} | **{s['speed_ratio']:.2f}x** | {s['align_peak_rss_mb']:.0f} | "
              f"{s['trl_peak_rss_mb']:.0f} | {s['align_' + q]:.4f} / {s['trl_' + q]:.4f} | "
              f"{s['load_avg_range'][0]:.1f}-{s['load_avg_range'][1]:.1f} |")
    log.close()


if __name__ == "__main__":
    main()
