"""`align grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) through TRL's
GRPOTrainer, from the SFT model with PPO's prompts and reward.

One step: for rollout_batch_size / G prompts, sample G responses each; score them with the reward
(a reward model, its stored bias subtracted, or a function); advantage A_i = (r_i - mean_group(r)) /
std_group(r) (`scale_rewards: group`; `batch` or `none` per Dr. GRPO, Liu et al. 2025); then the
clipped policy loss of PPO with that advantage on every response token, plus beta x KL to the
reference (k3 estimator, per token, in the loss rather than in the reward). No critic.

Ours: the config, the prompts (SFT template, our ids), the reward (align/trl_stages.RewardForTRL),
the run directory and metric names. TRL's: sampling, the loss, optimisation, checkpoints.
"""

from __future__ import annotations

from typing import Any

from align.config import GRPOStageConfig
from align.trl_stages import train_group_rl


def train_grpo(cfg: GRPOStageConfig, resume: bool = False, force: bool = False,
               dry_run: bool = False) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer

    return train_group_rl(cfg, "grpo", GRPOTrainer, GRPOConfig,
                          {"loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards}, resume, force, dry_run)
