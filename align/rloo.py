"""`align rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics") through TRL's
RLOOTrainer, from the SFT model with PPO's prompts and reward.

One step: for rollout_batch_size / G prompts, sample G responses each; reward r_i = score_i -
beta x sum_t (log pi - log pi_ref) (the KL, k1, summed over the response, enters the reward as in
PPO); baseline b_i = mean of the other G - 1 rewards of its prompt; advantage A_i = r_i - b_i
(optionally whitened); REINFORCE with PPO's ratio clipping when a batch is reused. No critic.

Ours: the config, the prompts (SFT template, our ids), the reward (align/trl_stages.RewardForTRL),
the run directory and metric names. TRL's: sampling, the loss, optimisation, checkpoints.
"""

from __future__ import annotations

from typing import Any

from align.config import RLOOStageConfig
from align.trl_stages import train_group_rl


def train_rloo(cfg: RLOOStageConfig, resume: bool = False, force: bool = False,
               dry_run: bool = False) -> dict[str, Any]:
    from trl import RLOOConfig, RLOOTrainer

    return train_group_rl(cfg, "rloo", RLOOTrainer, RLOOConfig,
                          {"normalize_advantages": cfg.normalize_advantages}, resume, force, dry_run)
