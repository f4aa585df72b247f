"""Pure tensor functions for RLHF: KL estimators, per-token rewards, GAE, the advantage estimators
of the online methods (registered in `ESTIMATORS`), the PPO losses and their aggregation
(`agg_loss`), DAPO's dynamic-sampling filter and overlong penalty, sampler/trainer importance
correction, the Bradley-Terry reward-model loss, KL-coefficient controllers and EOS truncation.

Nothing here knows about configs, models or processes; every function takes tensors and returns
tensors (plus, for the losses, a dict of detached statistics), and each is tested against
hand-computed values and naive loops in `tests/test_rl.py` and `tests/test_rl_methods.py`.

Conventions: B = batch (sequences), T = response length (padded). `response_mask` is (B, T), 1 on
the response tokens that count, built from lengths (`ops.lengths_to_mask`), never from token
equality. Responses are right-padded: the real tokens of a row are a prefix of it. Every token
reduction is a token mean over the masked positions of the whole batch (`ops.masked_mean`), not a
mean of per-sequence means, unless `agg_loss` is asked for another mode. With n responses per
prompt (a group), rows are prompt-major: prompt 0 x n, prompt 1 x n, ...

Sources:
- PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation".
- KL estimators k1/k2/k3: Schulman, "Approximating KL Divergence" (2020 note).
- Per-token KL penalty and the adaptive KL controller: Ziegler et al. 2019, "Fine-Tuning Language
  Models from Human Preferences".
- Details (score at the last token, value clipping, EOS truncation, approxkl): Huang et al. 2024,
  "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization".
- GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models". Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective". RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
  Optimization for Learning from Human Feedback in LLMs". REINFORCE++: Hu 2025, "REINFORCE++: A
  Simple and Efficient Approach for Aligning Large Language Models". ReMax: Li et al. 2023, "ReMax:
  A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models".
- Clip-higher, dynamic sampling, token-mean loss, overlong punishment: Yu et al. 2025, "DAPO: An
  Open-Source LLM Reinforcement Learning System at Scale". Dual clip: Ye et al. 2020, "Mastering
  Complex Control in MOBA Games with Deep Reinforcement Learning".
- Truncated importance sampling against a sampler/trainer mismatch: Yao et al. 2025, "Your Efficient
  RL Framework Secretly Brings You Off-Policy RL Training".
- Registry and loss-aggregation names: verl (`core_algos.py`, `register_adv_est`, `agg_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from align.ops import lengths_to_mask, masked_mean, masked_sum, masked_var, masked_whiten

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
# Advantage estimators of the online methods (one registered function each)
# --------------------------------------------------------------------------------------------


@dataclass
class AdvantageInput:
    """Everything an estimator may read; each reads only the fields its docstring names.

    Rows are prompt-major: with n = `group_size`, rows [k*n, (k+1)*n) are the n responses to prompt
    k. All tensors are constants (detached); the estimators run under `torch.no_grad()`.
    """

    scores: torch.Tensor  # (B,) sequence scores, already shaped (penalties, clipping)
    response_mask: torch.Tensor  # (B, T) right-padded, 1 on response tokens
    group_size: int = 1  # n responses per prompt
    kl: torch.Tensor | None = None  # (B, T) per-token KL estimate; read only when the KL is in the reward
    kl_coef: float = 0.0  # beta of the KL in the reward (0 when the KL is in the loss)
    values: torch.Tensor | None = None  # (B, T) critic values (gae only)
    baseline_scores: torch.Tensor | None = None  # (B,) score of the greedy response to each row's prompt (remax)
    gamma: float = 1.0  # discount over response tokens (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda (gae)
    eps: float = 1e-6  # added to the group std (grpo)
    whiten_rewards: bool = False  # gae: whiten the per-token rewards over the batch (scale only) before GAE


EstimatorFn = Callable[[AdvantageInput], tuple[torch.Tensor, torch.Tensor | None]]
"""An estimator: AdvantageInput -> (advantages (B, T), returns (B, T) or None)."""


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator and what the loop must provide for it."""

    name: str
    fn: EstimatorFn  # -> (advantages (B, T), returns (B, T) or None)
    needs_critic: bool  # reads `values` and produces returns for a value loss (gae only)
    group: bool  # needs group_size >= 2 responses per prompt
    needs_greedy_baseline: bool  # reads `baseline_scores` (remax)
    default_kl: str  # "reward" or "loss": where the method puts the KL by default
    source: str  # citation


ESTIMATORS: dict[str, Estimator] = {}
"""Every advantage estimator, by name; filled once by `register_estimator` below."""

KL_PLACEMENTS = ("reward", "loss")


def register_estimator(
    name: str,
    *,
    needs_critic: bool = False,
    group: bool = False,
    needs_greedy_baseline: bool = False,
    default_kl: str = "reward",
    source: str = "",
) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: add the function to `ESTIMATORS` under `name` (as verl's `@register_adv_est`).
    A name is registered once; a second registration is an error, never a silent override."""
    if default_kl not in KL_PLACEMENTS:
        raise ValueError(f"default_kl must be one of {', '.join(KL_PLACEMENTS)}, got {default_kl!r}")

    def decorator(fn: EstimatorFn) -> EstimatorFn:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = Estimator(name, fn, needs_critic, group, needs_greedy_baseline, default_kl, source)
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """The registered estimator called `name`; ValueError naming the valid ones otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


def _sequence_rewards(inp: AdvantageInput) -> torch.Tensor:
    """(B,) r_i = score_i - beta * sum_t kl_{i,t} over the response tokens of row i (the sequence-level
    KL in the reward); the bare scores when there is no KL or beta is 0."""
    if inp.kl is None or inp.kl_coef == 0:
        return inp.scores
    return inp.scores - inp.kl_coef * masked_sum(inp.kl, inp.response_mask, dim=1)


def _grouped(r: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / n, n), one row per prompt; ValueError unless n >= 2 divides B."""
    if group_size < 2:
        raise ValueError(f"a group estimator needs group_size >= 2 responses per prompt, got {group_size}")
    if r.shape[0] % group_size:
        raise ValueError(f"batch of {r.shape[0]} rows is not a whole number of groups of {group_size}")
    return r.view(-1, group_size)


def _broadcast(advantage: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantage -> (B, T): the same value on every response token, 0 on padding."""
    return advantage[:, None] * response_mask.to(advantage.dtype)


@register_estimator("gae", needs_critic=True, default_kl="reward",
                    source="Schulman et al. 2016 (GAE), 2017 (PPO); Ziegler et al. 2019 (per-token KL reward)")
@torch.no_grad()
def gae_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: per-token rewards r_t = -beta * kl_t plus the score at the last response
    token (`per_token_rewards`; no KL when `kl` is None), then `gae(r, values, mask, gamma, lam)`.

    Returns (advantages (B, T), returns (B, T)), both 0 on padding. Not whitened: the loop whitens
    advantages optionally, as `ppo.rollout_targets` does. Needs `values`.
    """
    if inp.values is None:
        raise ValueError("the gae estimator needs critic values (AdvantageInput.values)")
    kl = torch.zeros_like(inp.values) if inp.kl is None else inp.kl
    rewards, _ = per_token_rewards(inp.scores, kl, inp.response_mask, inp.kl_coef)
    if inp.whiten_rewards:  # `reward.whiten`
        rewards = masked_whiten(rewards, inp.response_mask, shift_mean=False)
    return gae(rewards, inp.values, inp.response_mask, inp.gamma, inp.lam)


@register_estimator("grpo", group=True, default_kl="loss", source="Shao et al. 2024 (DeepSeekMath, GRPO)")
@torch.no_grad()
def grpo_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, None]:
    """Group-normalised outcome advantage: A_i = (r_i - mean_g r) / (std_g r + eps), broadcast to
    every response token of row i.

    r_i = `_sequence_rewards` (the score, minus beta * sum_t kl_t when the KL is in the reward; GRPO
    puts it in the loss by default). std_g is the unbiased sample std of the group (Bessel, / (n-1);
    torch's default) and eps is added to the std, outside the square root: the conventions of TRL's
    GRPOTrainer (`nanstd`, `/ (std + 1e-4)`) and verl (`torch.std`, `/ (std + 1e-6)`). The paper does
    not say which std; TRL's 1e-4 is `eps=1e-4`. A group whose rewards all match gets A = 0.
    Returns (advantages (B, T), None).
    """
    r = _grouped(_sequence_rewards(inp), inp.group_size)  # (B/n, n)
    advantage = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + inp.eps)
    return _broadcast(advantage.reshape(-1), inp.response_mask), None


@register_estimator("dr_grpo", group=True, default_kl="loss", source="Liu et al. 2025 (Dr. GRPO)")
@torch.no_grad()
def dr_grpo_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, None]:
    """GRPO without the std division ("Dr. GRPO"): A_i = r_i - mean_g r, broadcast to every response
    token; r_i as in `grpo`. The paper's other change, no 1/|o_i| length normalisation, is the loss
    aggregation `seq-mean-token-sum-norm` (`agg_loss`). Returns (advantages (B, T), None).
    """
    r = _grouped(_sequence_rewards(inp), inp.group_size)  # (B/n, n)
    advantage = r - r.mean(1, keepdim=True)
    return _broadcast(advantage.reshape(-1), inp.response_mask), None


@register_estimator("rloo", group=True, default_kl="reward",
                    source="Ahmadian et al. 2024 (Back to Basics: REINFORCE leave-one-out)")
@torch.no_grad()
def rloo_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, None]:
    """REINFORCE leave-one-out: A_i = r_i - (sum_{j != i} r_j) / (n - 1), the mean reward of the other
    n - 1 responses to the same prompt as baseline, broadcast to every response token.

    r_i = score_i - beta * sum_t kl_{i,t} (the KL in the reward, at sequence level). Equal to verl's
    n/(n-1) * (r_i - mean_g r). Returns (advantages (B, T), None).
    """
    r = _grouped(_sequence_rewards(inp), inp.group_size)  # (B/n, n)
    baseline = (r.sum(1, keepdim=True) - r) / (inp.group_size - 1)
    return _broadcast((r - baseline).reshape(-1), inp.response_mask), None


@register_estimator("reinforce_pp", default_kl="reward", source="Hu 2025 (REINFORCE++)")
@torch.no_grad()
def reinforce_pp_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: per-token rewards r_t (the score at the last response token, -beta * kl_t on every
    response token: `per_token_rewards`, with k1 the paper's KL), discounted returns
        G_t = sum_{k >= t} gamma^(k - t) r_k   over the response tokens of the row,
    and advantages = G whitened over all response tokens of the batch (`ops.masked_whiten`: mean
    shifted, unbiased variance). No critic and no group baseline: the batch statistics are the
    baseline. Returns (advantages (B, T), returns G (B, T) unwhitened), both 0 on padding.
    """
    mask = inp.response_mask
    kl = torch.zeros(mask.shape, dtype=inp.scores.dtype, device=mask.device) if inp.kl is None else inp.kl
    rewards, _ = per_token_rewards(inp.scores, kl, mask, inp.kl_coef)
    B, T = rewards.shape
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    returns = torch.empty_like(rewards)
    for t in reversed(range(T)):  # vectorised over B; rewards past the end are 0
        running = rewards[:, t] + inp.gamma * running
        returns[:, t] = running
    returns = returns * mask.to(returns.dtype)  # drops an empty row's score (`per_token_rewards` puts it at 0)
    return masked_whiten(returns, mask), returns


@register_estimator("remax", needs_greedy_baseline=True, default_kl="reward",
                    source="Li et al. 2023 (ReMax)")
@torch.no_grad()
def remax_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, None]:
    """ReMax: A_i = (score_i - beta * sum_t kl_{i,t}) - score(greedy response to prompt i), broadcast
    to every response token.

    The greedy baseline gets no KL term: it is the bare score `baseline_scores`, as in the paper
    (the reward of the greedy response) and verl. Any baseline that does
    not depend on the sampled response keeps the gradient unbiased, and the greedy response's KL would
    cost a reference forward over it. Departs from verl, which subtracts the baseline from per-token
    returns (so with the KL in the reward, later tokens see less KL); here A is one value per sequence,
    as for the other critic-free methods. Returns (advantages (B, T), None).
    """
    if inp.baseline_scores is None:
        raise ValueError("the remax estimator needs the greedy responses' scores (AdvantageInput.baseline_scores)")
    advantage = _sequence_rewards(inp) - inp.baseline_scores
    return _broadcast(advantage, inp.response_mask), None


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float | None = None,
    clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss (Schulman et al. 2017, eq. 7), not yet reduced: pair it with
    `agg_loss`.

    logprobs: (B, T) under the current policy (with grad); old_logprobs, advantages: (B, T) from the
    rollout (constants); mask: (B, T). With ratio = exp(logp - logp_old):
        L = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    clip-higher (DAPO, Yu et al. 2025) when eps_high > eps_low; eps_high None is eps_low (plain PPO).
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"), when clip_c
    is given (> 1): where A < 0, L = min(L, -clip_c * A), so a very large ratio on a bad token cannot
    make the loss unbounded (the capped tokens get no gradient).
    Returns (loss matrix (B, T), 0 on padding, stats). Stats (detached scalars, token means over the
    mask): `clipfrac` fraction where the clipped term is strictly larger (gradient 0), split into
    `clipfrac_low` (A < 0, ratio clipped at 1 - eps_low) and `clipfrac_high` (A > 0, at 1 + eps_high);
    `dual_clipfrac` fraction capped by the dual clip (0 without it); `approxkl` mean
    0.5 * (logp - logp_old)**2; `ratio` mean ratio; `ratio_var` its unbiased variance.
    """
    if eps_high is None:
        eps_high = eps_low
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual clip needs clip_c > 1, got {clip_c}")
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_mat = torch.max(pg_losses, pg_losses_clipped)  # (B, T)
    dual_clipped = torch.zeros_like(loss_mat, dtype=torch.bool)
    if clip_c is not None:
        cap = -clip_c * advantages
        dual_clipped = (advantages < 0) & (cap < loss_mat)
        loss_mat = torch.where(dual_clipped, cap, loss_mat)
    loss_mat = torch.where(mask.bool(), loss_mat, torch.zeros_like(loss_mat))
    with torch.no_grad():
        clipped = pg_losses_clipped > pg_losses
        stats = {
            "clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
            "clipfrac_low": masked_mean((clipped & (advantages < 0)).to(ratio.dtype), mask),
            "clipfrac_high": masked_mean((clipped & (advantages > 0)).to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean(dual_clipped.to(ratio.dtype), mask),
            "approxkl": masked_mean(0.5 * logratio**2, mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss_mat, stats


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
    a token mean over the whole batch (`ops.masked_mean`): `clipped_policy_loss` with
    eps_low = eps_high = eps, reduced by `agg_loss(..., "token-mean")`.
    Stats (detached scalars): `clipfrac` fraction of response tokens where the clipped term is
    strictly larger (so its gradient is 0); `approxkl` = mean 0.5 * (logp - logp_old)**2 (the
    estimator TRL logged as `policy/approxkl_avg`); `ratio` mean ratio; `ratio_var` its unbiased
    variance over response tokens.
    """
    loss_mat, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps)
    return masked_mean(loss_mat, mask), {k: stats[k] for k in ("clipfrac", "approxkl", "ratio", "ratio_var")}


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    global_tokens: int | torch.Tensor | None = None,
    global_seqs: int | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss matrix L with mask m (B, T) to a scalar (verl's mode names):
        token-mean               sum(m L) / N_tokens                         (DAPO; PPO here)
        seq-mean-token-mean      sum_b (sum_t m L / sum_t m) / N_seqs         (GRPO paper)
        seq-mean-token-sum       sum_b (sum_t m L) / N_seqs
        seq-mean-token-sum-norm  sum(m L) / (N_seqs * max_len)               (Dr. GRPO)
    N_tokens = `global_tokens` and N_seqs = `global_seqs`, the counts over the WHOLE minibatch (every
    micro-batch, every process); by default this batch's own (mask.sum(), B). Given the minibatch's
    counts, the sum over its micro-batches of agg_loss equals agg_loss on the whole minibatch, so
    gradient accumulation and data parallelism (with gradients summed) change nothing.
    A row with no response token contributes 0 to seq-mean-token-mean but still counts in N_seqs
    (verl divides its 0 by 0 there).
    `max_len` is Dr. GRPO's constant generation budget (default T = loss_mat.shape[1]); pass it when
    micro-batches are padded to different lengths, or the split changes the result. verl divides by
    max_len alone (no N_seqs): the same direction, a B times larger scale.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")
    mask = mask.to(loss_mat.dtype)
    n_tokens = mask.sum() if global_tokens is None else global_tokens
    n_seqs = loss_mat.shape[0] if global_seqs is None else global_seqs
    if mode == "token-mean":
        # clamp: a batch without a response token gives 0, not 0/0
        return masked_sum(loss_mat, mask) / torch.as_tensor(n_tokens, dtype=loss_mat.dtype).clamp(min=1.0)
    seq_sums = masked_sum(loss_mat, mask, dim=1)  # (B,)
    if mode == "seq-mean-token-mean":
        return (seq_sums / mask.sum(1).clamp(min=1.0)).sum() / n_seqs
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / n_seqs
    return seq_sums.sum() / (n_seqs * (loss_mat.shape[1] if max_len is None else max_len))


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


# --------------------------------------------------------------------------------------------
# DAPO: dynamic sampling and the soft overlong punishment (Yu et al. 2025)
# --------------------------------------------------------------------------------------------


def zero_variance_groups(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """(B,) scores -> (B / n,) bool, True for each group (prompt-major rows, n = `group_size`) whose
    scores all lie within `atol` of each other (max - min <= atol). Such a group has zero advantage
    under grpo / dr_grpo / rloo and gives no gradient; DAPO's dynamic sampling drops it and samples
    more prompts. A group holding a NaN score is not flagged. ValueError unless n >= 2 divides B.
    """
    grouped = _grouped(scores, group_size)  # (B/n, n)
    return (grouped.max(1).values - grouped.min(1).values) <= atol


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a length-only reward to add to the score.

    lengths: (B,) long, response lengths; max_len: L_max, the generation budget; buffer: L_cache,
    the punishment interval; factor scales the penalty (the paper's is 1). Returns (B,) float:
        0                                         if len <= max_len - buffer
        factor * ((max_len - buffer) - len) / buffer   if max_len - buffer < len <= max_len (0 to -factor)
        -factor                                   if len > max_len
    so a response that hits the budget (truncated) gets -factor.
    """
    if not 1 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [1, max_len={max_len}], got {buffer}")
    over = (lengths - (max_len - buffer)).clamp(min=0, max=buffer)  # (B,) tokens into the buffer
    return -factor * over.to(torch.get_default_dtype()) / buffer


# --------------------------------------------------------------------------------------------
# Sampler / trainer mismatch (a rollout engine whose log-probs differ from the trainer's)
# --------------------------------------------------------------------------------------------

ROLLOUT_CORRECTIONS = ("tis", "mis")


def rollout_correction(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float,
) -> torch.Tensor:
    """Per-token importance weights for tokens sampled by an engine (vLLM, SGLang) whose numerics
    differ from the trainer's, to multiply the per-token policy loss (Yao et al. 2025, "Your Efficient
    RL Framework Secretly Brings You Off-Policy RL Training").

    trainer_logprobs: (B, T) the trainer's log-probs of the sampled tokens under the rollout's
    weights (the old log-probs); sampler_logprobs: (B, T) the engine's; mask: (B, T).
    With ratio = exp(trainer - sampler):
        tis (truncated IS):  w = min(ratio, cap)
        mis (masked IS):     w = ratio where ratio <= cap, else 0 (the token is dropped)
    Returns (B, T) weights, detached, 0 on padding.
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; expected one of {', '.join(ROLLOUT_CORRECTIONS)}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        ratio = torch.exp(trainer_logprobs - sampler_logprobs)  # (B, T)
        if mode == "tis":
            weights = ratio.clamp(max=cap)
        else:
            weights = torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))
        return torch.where(mask.bool(), weights, torch.zeros_like(weights))


def logprob_diff_stats(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's, over the response tokens (detached
    scalars): `logprob_diff_mean` mean |trainer - sampler| (absolute, as verl's rollout-probs diff,
    so errors of both signs cannot cancel), `logprob_diff_max` max |trainer - sampler| (0 for an empty
    mask), `ratio_outside_0.9_1.1` fraction of tokens with exp(trainer - sampler) outside [0.9, 1.1].
    """
    with torch.no_grad():
        abs_diff = torch.where(mask.bool(), (trainer_logprobs - sampler_logprobs).abs(),
                               torch.zeros_like(trainer_logprobs))  # (B, T)
        ratio = torch.exp(trainer_logprobs - sampler_logprobs)
        outside = ((ratio < 0.9) | (ratio > 1.1)).to(ratio.dtype)
        return {
            "logprob_diff_mean": masked_mean(abs_diff, mask),
            "logprob_diff_max": abs_diff.max(),
            "ratio_outside_0.9_1.1": masked_mean(outside, mask),
        }
