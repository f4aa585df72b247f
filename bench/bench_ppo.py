#!/usr/bin/env python
"""align PPO on the peers' bench work (`../shared/peers/README.md`): one JSON line.

    python bench/bench_ppo.py --hidden 64 --layers 2 [--peft] [--batch 8] [--resp-len 16] [--steps 4]

The policy (= reference), value model and reward model are `trl_ppo.py`'s, built from the same
config and seed by `bench/common.py` (value and reward: randomly initialised sequence classifiers)
and saved with save_pretrained. align then runs `train_ppo` in this process with the peer's
settings: 64 prompts, rollout batch 8, response length 16, 4 PPO epochs, one minibatch, temperature
0.7, k1 KL with beta 0.05, clip 0.2 (policy and value), vf_coef 0.1, gamma 1, lambda 0.95, missing
EOS penalty 1.0, lr 1e-4 for policy and value (the peer trains both with one optimizer), fp32.
`--peft` is align's `memory_mode: lora` (LoRA r 8, alpha 16 on q_proj, v_proj; reference = the
adapter disabled; the value model trained in full, as the peer does). The critic starts from the
peer's value model (`critic.path`), not from the reward model (align's default).

`--share-actor`: `critic.share_actor` (a value head on the actor's trunk; no value model).
`--method grpo`: `bench/trl_grpo.py`'s work: the batch counts responses (batch / group prompts a
step, a group of 4 each), one optimisation pass, KL (k3, beta 0.05) in the loss, token-mean loss,
no critic, no missing-EOS penalty.

Timing: `train_time_sec` is align's PPO loop (first rollout to last update), like the peer's timer
around `trainer.train()`; `call_time_sec` is the whole `train_ppo` call, loading and saving included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets offline env and sys.path)
from common import Profiler, build_in_subprocess, emit, peak_memory_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="PPO updates (rollout batches), as the peer's --steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resp-len", type=int, default=16)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peft", action="store_true", help="memory_mode lora (the peer's --peft)")
    ap.add_argument("--share-actor", action="store_true", help="critic.share_actor: a value head on the actor")
    ap.add_argument("--method", default="ppo", choices=["ppo", "grpo"],
                    help="grpo: bench/trl_grpo.py's work (2 prompts x a group of 4, one pass, KL k3 in the loss)")
    ap.add_argument("--group", type=int, default=4, help="grpo: responses per prompt")
    ap.add_argument("--set", action="append", default=[], help="extra align config overrides key=value")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from align.config import PPOConfig, from_dict, parse_override, set_dotted
    from align.ppo import train_ppo
    from align.rundir import read_metrics

    root = Path(tempfile.mkdtemp(prefix="align_bench_ppo_"))
    paths = build_in_subprocess("ppo", root, args.hidden, args.layers, num_prompts=max(args.num_prompts, args.batch),
                                seed=args.seed)
    b = args.batch
    raw = {
        "output_dir": str(root / "run"), "seed": args.seed,
        "model": {"path": str(paths["policy"]), "dtype": "float32"},
        "memory_mode": "lora" if args.peft else "full",
        "lora": {"r": 8, "alpha": 16, "target": ["q_proj", "v_proj"]},
        "critic": {"path": str(paths["value"]), "lr": 1e-4, "lora": False},
        "reward": {"model": str(paths["reward"]), "missing_eos_penalty": 1.0},
        "data": {"train": str(paths["prompts"])},
        "ppo": {"total_episodes": args.steps * b, "rollout_batch_size": b, "mini_batch_size": b,
                "micro_batch_size": b, "ppo_epochs": args.ppo_epochs, "response_length": args.resp_len,
                "temperature": 0.7, "kl_estimator": "k1", "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95,
                "whiten_advantages": True, "clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1,
                "ent_coef": 0.0, "lr": 1e-4, "max_grad_norm": 1.0, "mixed_precision": "no", "log_every": 1,
                "sample_every": 10**9, "eval_every": 10**9, "save_every": 10**9},
    }
    cls = PPOConfig
    if args.share_actor:
        raw["critic"] = {"share_actor": True, "lr": 1e-4}
    if args.method == "grpo":  # trl_grpo.py's settings; the batch counts responses: batch / group prompts
        from align.config import GRPOStageConfig as cls  # noqa: N813

        raw.pop("critic")
        raw["reward"]["missing_eos_penalty"] = None  # TRL's GRPO has no EOS penalty unless asked
        raw["ppo"].update({"estimator": "grpo", "n_samples_per_prompt": args.group, "ppo_epochs": 1,
                           "kl_placement": "loss", "kl_estimator": "k3", "whiten_advantages": False,
                           "loss_agg": "token-mean"})
    for item in args.set:
        set_dotted(raw, *parse_override(item))
    cfg = from_dict(cls, raw)
    cfg.validate()

    import accelerate  # noqa: F401  (the libraries align loads lazily, so the baseline holds them)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

    rss_before = peak_memory_mb()  # interpreter and libraries: what any training process pays first
    t0 = time.perf_counter()
    with Profiler(args.profile, args.profile_out):
        summary = train_ppo(cfg)
    call_time = time.perf_counter() - t0
    rows = [r for r in read_metrics(root / "run" / "metrics.jsonl") if "objective/scores" in r]
    dt = summary["train_time_sec"]
    emit({"tool": "align", "bench": args.method, "hidden": args.hidden, "layers": args.layers,
          "mode": "lora" if args.peft else "shared" if args.share_actor else "full", "batch": b, "resp_len": args.resp_len,
          "episodes_per_sec": summary["episodes"] / dt, "tokens_per_sec": summary["tokens_seen"] / dt,
          "peak_rss_mb": peak_memory_mb(), "rss_before_train_mb": rss_before, "final_score": rows[-1]["objective/scores"],
          "final_kl": rows[-1]["objective/kl"], "train_time_sec": dt, "step_time_sec": dt / summary["steps"],
          "rollout_time_sec": sum(r["time/rollout"] for r in rows) / len(rows),
          "update_time_sec": sum(r["time/update"] for r in rows) / len(rows),
          "weight_sync_sec": sum(r["time/weight_sync"] for r in rows) / len(rows),
          "engine": cfg.rollout.engine,
          "call_time_sec": call_time, "episodes": summary["episodes"]})


if __name__ == "__main__":
    main()
