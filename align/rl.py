"""Pure tensor functions for RLHF: KL estimators, per-token rewards, GAE, the PPO losses, the
Bradley-Terry reward-model loss, KL-coefficient controllers and EOS truncation.

Nothing here knows about configs, models or processes; every function takes tensors and returns
tensors (plus, for the losses, a dict of detached statistics), and each is tested against
hand-computed values and naive loops in `tests/test_rl.py`.

Conventions: B = batch (sequences), T = response length (padded). `response_mask` is (B, T), 1 on
the response tokens that count, built from lengths (`ops.lengths_to_mask`), never from token
equality. Responses are right-padded: the real tokens of a row are a prefix of it. Every token
reduction is a token mean over the masked positions of the whole batch (`ops.masked_mean`), not a
mean of per-sequence means.

Sources:
- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation".
- KL estimators k1/k2/k3: Schulman, "Approximating KL Divergence" (2020 note).
- Per-token KL penalty and the adaptive KL controller: Ziegler et al. 2019, "Fine-Tuning Language
  Models from Human Preferences".
- Details (score at the last token, value clipping, EOS truncation, approxkl): Huang et al. 2024,
  "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.ops import lengths_to_mask, masked_mean, masked_var

KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------
# KL and rewards
# --------------------------------------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(actor || reference) from log-probs of the sampled tokens.

    logprobs, ref_logprobs: (B, T) log p(y_t) under the actor and the reference, for tokens sampled
    from the actor. Returns (B, T), no reduction. With logr = logp_ref - logp (Schulman's note):
      k1 = -logr                      unbiased, high variance, can be negative per token;
      k2 = 0.5 * logr**2              biased, low variance, >= 0;
      k3 = exp(logr) - 1 - logr       unbiased, low variance, >= 0 (since exp(x) >= 1 + x).
    """
    logr = ref_logprobs - logprobs  # (B, T)
    if kind == "k1":
        return -logr
    if kind == "k2":
        return 0.5 * logr**2
    if kind == "k3":
        # expm1(x) - x == exp(x) - 1 - x, without the cancellation error near x = 0.
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO reward: r_t = -beta * kl_t on response tokens, plus the sequence score at the
    last response token (Ziegler et al. 2019; Huang et al. 2024, detail "reward at the EOS").

    scores: (B,) one scalar per sequence (reward model or function, after any EOS penalty).
    kl: (B, T) per-token KL estimate (`kl_estimate`). response_mask: (B, T), right-padded.
    Returns (rewards (B, T), non_score_reward (B, T)), both 0 on padding; rewards includes the score,
    non_score_reward is only the KL part (logged as `objective/non_score_reward`).

    The last response token is index `response_mask.sum(1) - 1`. A row with no response token at
    all (rare: an empty generation) gets its score at index 0, so no score is silently dropped;
    its KL part is 0. Inputs are treated as constants: pass detached tensors.
    """
    mask = response_mask.to(kl.dtype)
    non_score_reward = -beta * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
    rewards = non_score_reward.scatter_add(1, last[:, None], scores.to(kl.dtype)[:, None])
    return rewards, non_score_reward


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    rewards, values, mask: (B, T), mask right-padded. With V_{t+1} = 0 after the last response
    token (the episode ends there) and rewards/values past the end treated as 0:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t
    Returns (advantages (B, T), returns (B, T)), 0 on masked positions. No whitening here: the
    caller whitens advantages over the batch's response tokens with `ops.masked_whiten`.
    Inputs are treated as constants: call under `torch.no_grad()` or pass detached tensors.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # past the end: r = V = 0
    B, T = values.shape
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)  # A_{T} = 0
    advantages_reversed = []
    for t in reversed(range(T)):  # vectorised over B
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_adv = delta + gamma * lam * next_adv
        advantages_reversed.append(next_adv)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logprobs: (B, T) under the current policy (with grad); old_logprobs, advantages: (B, T) from the
    rollout (constants); mask: (B, T). ratio = exp(logp - logp_old);
        loss = mean over response tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    a token mean over the whole batch (`ops.masked_mean`).
    Stats (detached scalars): `clipfrac` fraction of response tokens where the clipped term is
    strictly larger (so its gradient is 0); `approxkl` = mean 0.5 * (logp - logp_old)**2 (the
    estimator TRL logged as `policy/approxkl_avg`); `ratio` mean ratio; `ratio_var` its unbiased
    variance over response tokens.
    """
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approxkl": masked_mean(0.5 * logratio**2, mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss with optional value clipping (Huang et al. 2024, "value function loss clipping";
    the PPO2 baselines implementation).

    values: (B, T) current predictions (with grad); old_values, returns: (B, T) from the rollout;
    mask: (B, T). With V_clip = clip(V, V_old - eps, V_old + eps):
        loss = 0.5 * mean over response tokens of max((V - R)**2, (V_clip - R)**2),
    or 0.5 * mean (V - R)**2 when `clip_eps` is None. Token mean over the whole batch.
    Stats (detached scalars): `clipfrac` fraction of response tokens where the clipped error is
    strictly larger (0 without clipping); `vpred` mean prediction; `error` mean (V - R)**2.
    """
    error = (values - returns) ** 2  # (B, T)
    if clip_eps is None:
        loss = 0.5 * masked_mean(error, mask)
        clipped_larger = torch.zeros_like(error)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        error_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(error, error_clipped), mask)
        clipped_larger = (error_clipped > error).to(error.dtype)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped_larger, mask),
            "vpred": masked_mean(values, mask),
            "error": masked_mean(error, mask),
        }
    return loss, stats


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss: mean over pairs of -log sigmoid(r_chosen - r_rejected - margin).

    chosen_scores, rejected_scores: (B,); margin: a float or (B,) (as in Llama 2's margin loss;
    0 gives plain Bradley-Terry). Stats (detached scalars, mean over pairs): `accuracy` fraction
    with r_chosen > r_rejected (ties count as wrong), `margin` mean r_chosen - r_rejected.
    """
    diff = chosen_scores - rejected_scores  # (B,)
    loss = -F.logsigmoid(diff - margin).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).to(diff.dtype).mean(),
            "margin": diff.mean(),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, section 2.2)
# --------------------------------------------------------------------------------------------


@dataclass
class FixedKLController:
    """A constant KL coefficient beta."""

    value: float  # beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive beta steering the measured KL towards `target` (Ziegler et al. 2019, eq. 2):

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    `n_steps` is the number of episodes (sequences) since the last update, as in the paper and TRL.
    """

    value: float  # beta, the current coefficient
    target: float  # KL_target, in nats per sequence as the caller measures it
    horizon: int  # K_beta, in episodes

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {self.target} and {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Only the coefficient is state; target and horizon come from the config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# EOS truncation
# --------------------------------------------------------------------------------------------


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) long: index of the first True in each row, T when a row has none."""
    T = bools.shape[-1]
    positions = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, T)).min(dim=-1).values


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sampled response after its first EOS (Huang et al. 2024, "truncate after EOS").

    responses: (B, T) long. Returns (responses (B, T) with every token after the first EOS set to
    `pad_token_id`, lengths (B,) long counting the EOS itself, has_eos (B,) bool). A row without an
    EOS keeps all T tokens (length T); the caller may penalise it (the "EOS trick"). Build the
    response mask from `lengths` (`ops.lengths_to_mask`), never from the pad id, which may equal EOS.
    """
    T = responses.shape[1]
    eos_index = first_true_index(responses == eos_token_id)  # (B,), T if none
    has_eos = eos_index < T
    lengths = torch.where(has_eos, eos_index + 1, torch.full_like(eos_index, T))
    keep = lengths_to_mask(lengths, T)  # (B, T)
    truncated = torch.where(keep, responses, torch.full_like(responses, pad_token_id))
    return truncated, lengths, has_eos
