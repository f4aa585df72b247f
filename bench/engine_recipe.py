#!/usr/bin/env python
"""The default recipe's results with each rollout engine, seed by seed (issue 17's "done when").

Two multi-seed roots of the same recipe that differ only in `ppo.rollout.engine`, both holding the
same task, SFT and reward model for each seed (copied from one `align run --seeds`), so that PPO and
eval are the only stages that differ:

    # in the vLLM environment (docs/scaling.md), from one earlier run's seed-N/{data,init,sft,rm}:
    .venvs/vllm/bin/python -m align run recipes/addition.yaml --seeds 0-4 --jobs 2 \
        --set output_root=ROOT_HF
    .venvs/vllm/bin/python -m align run recipes/addition.yaml --seeds 0-4 --jobs 2 \
        --set output_root=ROOT_VLLM --set ppo.rollout.engine=vllm
    python bench/engine_recipe.py ROOT_HF ROOT_VLLM [--model sft+ppo]

Prints, per seed and over seeds (mean with its hierarchical bootstrap interval, align/stats.py),
the greedy gold accuracy, the sampled gold accuracy and the KL to the SFT model of `--model` with
each engine, PPO's wall time, the largest sampler/trainer log-prob gap of the vLLM run
(`rollout/logprob_diff_max`), and the paired difference vLLM - HF on the same prompts with its
interval: the engines draw different samples (each its own random stream), so "reproduces within
noise" means an interval around 0, not equal numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from align.multiseed import seed_runs
from align.stats import hierarchical_bootstrap_ci, paired_difference, seed_level_difference


def ppo_stats(seed_root: Path) -> dict[str, float]:
    summary = json.loads((seed_root / "ppo" / "summary.json").read_text())
    rows = [json.loads(line) for line in (seed_root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout/logprob_diff_max"] for r in rows if "rollout/logprob_diff_max" in r]
    return {"wall_s": summary.get("train_time_sec", float("nan")), "gap_max": max(gaps) if gaps else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_root")
    ap.add_argument("vllm_root")
    ap.add_argument("--model", default="sft+ppo", help="the eval row to compare (default: sft+ppo)")
    args = ap.parse_args()
    runs = {"hf": seed_runs(args.hf_root), "vllm": seed_runs(args.vllm_root)}
    seeds = sorted({r.seed for r in runs["hf"]} & {r.seed for r in runs["vllm"]})
    if not seeds:
        raise SystemExit("the two roots share no finished seed")
    by_seed = {e: {r.seed: r for r in rs} for e, rs in runs.items()}
    keys = ("gold_reward", "sampled_gold_reward", "kl_to_reference")
    print(f"| seed | {' | '.join(f'{k} hf | {k} vllm' for k in keys)} | PPO s hf | PPO s vllm | max log-prob gap (vllm) |")
    print("|" + " --- |" * (2 * len(keys) + 4))
    for s in seeds:
        cells = []
        for k in keys:
            for e in ("hf", "vllm"):
                m = next(m for m in by_seed[e][s].results["models"] if m["name"] == args.model)
                cells.append(f"{m['metrics'].get(k, float('nan')):.3f}")
        st = {e: ppo_stats(by_seed[e][s].root) for e in ("hf", "vllm")}
        print(f"| {s} | {' | '.join(cells)} | {st['hf']['wall_s']:.0f} | {st['vllm']['wall_s']:.0f} | "
              f"{st['vllm']['gap_max']:.1e} |")
    print()
    for k in ("gold_reward", "sampled_gold_reward"):
        per = {e: [by_seed[e][s].per_prompt(args.model, k) for s in seeds] for e in ("hf", "vllm")}
        ivs = {e: hierarchical_bootstrap_ci(per[e]) for e in per}
        d = paired_difference(per["vllm"], per["hf"])
        print(f"{args.model} {k} over {len(seeds)} seeds: hf {ivs['hf'].mean:.3f} [{ivs['hf'].low:.3f}, "
              f"{ivs['hf'].high:.3f}], vllm {ivs['vllm'].mean:.3f} [{ivs['vllm'].low:.3f}, {ivs['vllm'].high:.3f}]; "
              f"vllm - hf {d.mean_diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] "
              f"({'significant' if d.significant else 'not significant'})")
    kl = {e: [next(m for m in by_seed[e][s].results["models"] if m["name"] == args.model)["metrics"]
              ["kl_to_reference"] for s in seeds] for e in ("hf", "vllm")}
    d = seed_level_difference(kl["vllm"], kl["hf"])
    print(f"{args.model} kl_to_reference: vllm - hf {d.mean_diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over seeds")


if __name__ == "__main__":
    main()
