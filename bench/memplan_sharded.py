"""The memory plan under data parallelism and sharding (align/memplan.py, `--strategy`) against
measured peaks per process: 2 CPU processes over gloo, each strategy launched with its
configs/accelerate/*_cpu_2proc.yaml file.

    python bench/memplan_sharded.py                         # the table of docs/performance.md
    python bench/memplan_sharded.py --sizes 256x8 --runs sft --strategies fsdp,zero3
    python bench/memplan_sharded.py --table rows.jsonl      # re-print a table from measured rows

The runs are bench/memplan.py's (`sft`, `ppo_full`, `grpo`: the same data, models and configs,
fp32), with twice the episodes for the RL runs so that each process still takes 2 steps. Each
measurement is one `python -m accelerate.commands.launch --config_file configs/accelerate/FILE
bench/memplan_sharded.py --child SPEC`: every process imports everything, runs the same stage
once on a throwaway 1-layer model (so code pages, lazy imports, the engine's own set-up are
resident), reads its resident set size, then trains. Its measured peak is the peak RSS it reached
by its last logged step (the `peak_memory_mb` every process computes for the step's metrics,
recorded per process here; the final model's save is after it) minus that baseline, as in
bench/memplan.py, with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors leave the RSS. The
table shows the larger of the two processes (they differ by a few MiB). The plan is
`align.memplan.stage_plan(..., strategy=S, processes=2)` on the same config, device cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import memplan as single  # noqa: E402  (bench/memplan.py: data, configs, RSS)

PROCESSES = 2
CONFIG_FILES = {"ddp": "ddp_cpu_2proc.yaml", "fsdp": "fsdp2_cpu_2proc.yaml", "zero2": "deepspeed_zero2_cpu_2proc.yaml",
                "zero3": "deepspeed_zero3_cpu_2proc.yaml"}
RUNS = ("sft", "ppo_full", "grpo")


def config_dict(run: str, model: Path, data: dict[str, Path], out: Path) -> tuple[str, dict[str, Any]]:
    stage, cfg = single.config_dict(run, model, data, out)
    if stage != "sft":  # 2 steps of each process's rollout batch
        cfg["ppo"]["total_episodes"] *= PROCESSES
    return stage, cfg


def child(spec_path: str) -> None:
    """One process of one launch: warm-up, baseline, the run; writes rank<N>.json beside the spec."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(1)
    import align.ppo
    import align.trainer
    from align import runtime
    from align.config import build_config
    from align.ppo import train_ppo
    from align.sft import train_sft

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    peaks: list[float] = []

    def recording() -> float:  # every process computes the step's peak for its metrics: keep ours
        value = runtime.peak_memory_mb()
        peaks.append(value)
        return value

    align.trainer.peak_memory_mb = recording
    align.ppo.peak_memory_mb = recording
    run = train_sft if spec["stage"] == "sft" else train_ppo
    warm = Path(spec["work"]) / "warm-model"  # built by the parent, before the launch
    warm_cfg = json.loads(json.dumps(spec["config"]))
    warm_cfg["model"]["path"], warm_cfg["output_dir"] = str(warm), spec["config"]["output_dir"] + "-warm"
    with contextlib.redirect_stdout(io.StringIO()):
        run(build_config(single.config_class(spec["stage"]), warm_cfg))
    cfg = build_config(single.config_class(spec["stage"]), spec["config"])
    peaks.clear()
    base = single.rss_now()
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    peak = int(peaks[-1] * 2**20)
    out = Path(spec_path).with_name(f"rank{rank}.json")
    out.write_text(json.dumps({"rank": rank, "baseline": base, "peak": peak, "measured": peak - base}))


def predicted(stage: str, cfg_dict: dict[str, Any], strategy: str) -> tuple[float, str]:
    from align.config import build_config
    from align.memplan import model_facts, stage_plan

    cfg = build_config(single.config_class(stage), cfg_dict)
    plan = stage_plan(stage, cfg, model_facts(stage, cfg), device="cpu", processes=PROCESSES, strategy=strategy)
    return plan.peak_bytes, plan.peak_phase.name


def measure(strategy: str, stage: str, cfg_dict: dict[str, Any], work: Path, tag: str) -> list[dict[str, Any]]:
    spec_dir = work / f"spec-{tag}"
    for old in (spec_dir, Path(cfg_dict["output_dir"]), Path(cfg_dict["output_dir"] + "-warm")):
        shutil.rmtree(old, ignore_errors=True)  # a rerun in the same --work folder starts afresh
    spec_dir.mkdir()
    spec = spec_dir / "spec.json"
    spec.write_text(json.dumps({"stage": stage, "config": cfg_dict, "work": str(work)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / CONFIG_FILES[strategy]), __file__, "--child", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads((spec_dir / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| model | run | strategy | plan's peak phase | plan (MiB) | measured (MiB, larger process) | "
          "plan / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        plan, phase = predicted(r["stage"], r["config"], r["strategy"])
        got = max(p["measured"] for p in r["ranks"])
        print(f"| {r['model']} | {r['run']} | {r['strategy']} | {phase} | {plan / 2**20:,.1f} | {got / 2**20:,.1f} | "
              f"{plan / got:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="128x4,256x8,512x8", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--strategies", default=",".join(CONFIG_FILES),
                        help=f"comma-separated, of {', '.join(CONFIG_FILES)}")
    parser.add_argument("--out", type=Path, default=None, help="also append the measured rows as JSON lines here")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the models, data and runs here (default: a temporary folder, removed)")
    parser.add_argument("--table", type=Path, default=None,
                        help="print the table of an --out file's rows (the plan recomputed; their --work folder "
                             "must still hold the models), measure nothing")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.table:
        print_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()])
        return
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except ImportError:
        pass
    print(f"# python {platform.python_version()}, {versions}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"{PROCESSES} processes x 1 thread; MALLOC_MMAP_THRESHOLD_=65536")
    rows = []
    with tempfile.TemporaryDirectory(prefix="align-memplan-sharded-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = single.make_data(work)
        if not (work / "warm-model").exists():
            from align.modeling import init_tiny_model

            init_tiny_model(work / "warm-model", hidden=32, layers=1, heads=4, max_position=512)
        for size in args.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            model = work / f"model-{size}"
            if not model.exists():
                subprocess.run([sys.executable, "-m", "align", "init-model", str(model), "--hidden", str(hidden),
                                "--layers", str(layers), "--heads", str(max(4, hidden // 64)), "--max-position",
                                "512"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            for run in args.runs.split(","):
                for strategy in args.strategies.split(","):
                    tag = f"{size}-{run}-{strategy}"
                    stage, cfg = config_dict(run, model, data, work / f"run-{tag}")
                    row = {"model": f"H={hidden} L={layers}", "run": run, "strategy": strategy, "stage": stage,
                           "config": cfg, "ranks": measure(strategy, stage, cfg, work, tag)}
                    rows.append(row)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row[k] for k in ("model", "run", "strategy", "ranks")}), flush=True)
        print_table(rows)


if __name__ == "__main__":
    main()
