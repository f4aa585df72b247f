#!/usr/bin/env python
"""Peer benchmark: TRL 1.16's GRPOTrainer on the bench spec's GRPO work, offline, on CPU. Runs in the
peers' `.venv-trl-sft` (trl 1.16.0); `bench/run_peers.py --benches grpo` runs it beside align.

    .venv-trl-sft/bin/python bench/trl_grpo.py --hidden 64 --layers 2 [--steps 4] [--prompts-per-step 2]

The work (`bench/common.py` `ppo_work`, the PPO peer's): the policy and a randomly initialised
reward model (a sequence classifier) built from the spec's Llama config, 64 prompts "Q: a+b? A:".
Each step: 2 prompts x a group of 4 responses (8 episodes), response length 16, temperature 0.7
(pure temperature sampling), one optimisation pass (`num_iterations` 1), beta 0.05 (k3 KL in the
loss), clip 0.2, token-mean loss (`dapo`), advantages scaled by the group std, lr 1e-4, fp32.
One `RESULT` line; throughput is measured around `trainer.train()` only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (offline env)
from common import build_in_subprocess, peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--resp-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="trl_grpo_"))
    paths = build_in_subprocess("ppo", root, args.hidden, args.layers, seed=args.seed)
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"], num_labels=1)
    prompts = [json.loads(line)["prompt"] for line in paths["prompts"].read_text().splitlines()]
    batch = args.prompts_per_step * args.group
    config = GRPOConfig(
        output_dir=str(root / "out"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.group, steps_per_generation=1, num_iterations=1, max_completion_length=args.resp_len,
        temperature=0.7, top_k=0, top_p=1.0, beta=0.05, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=1e-4, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, use_cpu=True, seed=args.seed, disable_tqdm=True, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], reward_processing_classes=[tok], args=config,
                          processing_class=tok, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    t0 = time.time()
    trainer.train()
    dt = time.time() - t0
    episodes = args.steps * batch
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"RESULT trl_grpo: steps={args.steps} episodes={episodes} train_time={dt:.2f}s "
          f"episodes_per_sec={episodes / dt:.2f} final_score={rewards[-1]:.4f} peak_rss_mb={peak_rss_mb():.1f}",
          flush=True)


if __name__ == "__main__":
    main()
