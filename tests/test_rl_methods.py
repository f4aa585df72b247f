"""Tests for the online-method math in align.rl: every advantage estimator against a naive loop and
hand-computed values, the estimator registry, clip-higher and dual clip, loss aggregation under
micro-batch splits, DAPO's dynamic-sampling filter and overlong penalty, and the sampler/trainer
importance correction."""

from __future__ import annotations

import math

import pytest
import torch

from align.ops import lengths_to_mask, masked_mean, masked_whiten
from align.rl import (
    ESTIMATORS,
    LOSS_AGG_MODES,
    AdvantageInput,
    agg_loss,
    clipped_policy_loss,
    gae,
    get_estimator,
    kl_estimate,
    logprob_diff_stats,
    overlong_penalty,
    per_token_rewards,
    policy_loss,
    register_estimator,
    rollout_correction,
    zero_variance_groups,
)

F64 = torch.float64


def _batch(seed: int, n_prompts: int, n: int, T: int = 6):
    """A prompt-major batch of n_prompts x n rows with lengths from 0 to T; kl and values carry
    large garbage on padding, so any leak of padding into a result shows."""
    g = torch.Generator().manual_seed(seed)
    B = n_prompts * n
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, T  # an empty row and a full one, always
    mask = lengths_to_mask(lengths, T)
    garbage = torch.full((B, T), 1e3, dtype=F64)
    kl = torch.where(mask, torch.rand(B, T, generator=g, dtype=F64), garbage)
    values = torch.where(mask, torch.randn(B, T, generator=g, dtype=F64), garbage)
    scores = torch.randn(B, generator=g, dtype=F64)
    return scores, lengths, mask, kl, values


# --------------------------------------------------------------------------------------------
# naive references: python floats and loops, no library code
# --------------------------------------------------------------------------------------------


def _naive_seq_rewards(scores, kl, lengths, beta):
    return [scores[i].item() - beta * sum(kl[i, t].item() for t in range(int(lengths[i])))
            for i in range(len(scores))]


def _naive_token_rewards(scores, kl, lengths, beta, i):
    L = int(lengths[i])
    r = [-beta * kl[i, t].item() for t in range(L)]
    if L:
        r[-1] += scores[i].item()
    return r


def _close(actual: torch.Tensor, expected) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=F64), atol=1e-9)


def _broadcast_rows(per_row, lengths, T):
    out = torch.zeros(len(per_row), T, dtype=F64)
    for i, a in enumerate(per_row):
        for t in range(int(lengths[i])):
            out[i, t] = a
    return out


def _naive_group_advantages(r, n, kind, eps=0.0):
    out = []
    for k in range(0, len(r), n):
        group = r[k:k + n]
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        for i, x in enumerate(group):
            if kind == "grpo":
                out.append((x - mean) / (std + eps))
            elif kind == "dr_grpo":
                out.append(x - mean)
            else:  # rloo: the mean of the other n - 1
                out.append(x - sum(y for j, y in enumerate(group) if j != i) / (n - 1))
    return out


def _naive_reinforce_pp(scores, kl, lengths, beta, gamma, T):
    B = len(scores)
    returns = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        r = _naive_token_rewards(scores, kl, lengths, beta, i)
        running = 0.0
        for t in reversed(range(len(r))):
            running = r[t] + gamma * running
            returns[i, t] = running
    tokens = [returns[i, t].item() for i in range(B) for t in range(int(lengths[i]))]
    mean = sum(tokens) / len(tokens)
    var = sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1)
    adv = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        for t in range(int(lengths[i])):
            adv[i, t] = (returns[i, t].item() - mean) / math.sqrt(var + 1e-8)
    return adv, returns


def _naive_gae_estimator(scores, kl, values, lengths, beta, gamma, lam, T):
    B = len(scores)
    adv, ret = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    for i in range(B):
        r = _naive_token_rewards(scores, kl, lengths, beta, i)
        L, last = len(r), 0.0
        for t in reversed(range(L)):
            next_value = values[i, t + 1].item() if t + 1 < L else 0.0
            last = r[t] + gamma * next_value - values[i, t].item() + gamma * lam * last
            adv[i, t] = last
            ret[i, t] = last + values[i, t].item()
    return adv, ret


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_contents_and_flags():
    assert set(ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax"}
    assert {k for k, e in ESTIMATORS.items() if e.needs_critic} == {"gae"}
    assert {k for k, e in ESTIMATORS.items() if e.group} == {"grpo", "dr_grpo", "rloo"}
    assert {k for k, e in ESTIMATORS.items() if e.needs_greedy_baseline} == {"remax"}
    # where the KL goes by default, as in DESIGN.md's table
    assert {k: e.default_kl for k, e in ESTIMATORS.items()} == {
        "gae": "reward", "grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce_pp": "reward",
        "remax": "reward"}
    for name, est in ESTIMATORS.items():
        assert est.name == name
        assert est.source and est.fn.__doc__
        assert get_estimator(name) is est


def test_get_estimator_unknown_names_the_valid_ones():
    with pytest.raises(ValueError, match="grpo.*rloo") as info:
        get_estimator("ppo")
    assert "ppo" in str(info.value)


def test_register_estimator_refuses_a_second_registration():
    before = dict(ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("grpo", group=True)(lambda inp: (inp.scores, None))
    with pytest.raises(ValueError, match="default_kl"):
        register_estimator("new_one", default_kl="nowhere")
    assert ESTIMATORS == before


# --------------------------------------------------------------------------------------------
# estimators against naive loops (several groups, rows of different lengths, an empty row)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n_prompts,n", [(0, 3, 4), (1, 4, 2), (2, 2, 5)])
@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_naive_loop(kind, beta, seed, n_prompts, n):
    scores, lengths, mask, kl, _ = _batch(seed, n_prompts, n)
    eps = 1e-6
    adv, returns = get_estimator(kind).fn(
        AdvantageInput(scores, mask, group_size=n, kl=kl, kl_coef=beta, eps=eps))
    per_row = _naive_group_advantages(_naive_seq_rewards(scores, kl, lengths, beta), n, kind, eps)
    assert returns is None
    assert adv.shape == mask.shape
    assert torch.allclose(adv, _broadcast_rows(per_row, lengths, mask.shape[1]), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,gamma", [(0.0, 1.0), (0.2, 1.0), (0.2, 0.9)])
def test_reinforce_pp_matches_naive_loop(seed, beta, gamma):
    scores, lengths, mask, kl, _ = _batch(seed, 4, 2)
    adv, returns = get_estimator("reinforce_pp").fn(
        AdvantageInput(scores, mask, kl=kl, kl_coef=beta, gamma=gamma))
    ref_adv, ref_returns = _naive_reinforce_pp(scores, kl, lengths, beta, gamma, mask.shape[1])
    assert torch.allclose(returns, ref_returns, atol=1e-12)
    assert torch.allclose(adv, ref_adv, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_remax_matches_naive_loop(seed, beta):
    scores, lengths, mask, kl, _ = _batch(seed, 3, 2)
    baseline = torch.randn(len(scores), generator=torch.Generator().manual_seed(seed + 10), dtype=F64)
    adv, returns = get_estimator("remax").fn(
        AdvantageInput(scores, mask, group_size=2, kl=kl, kl_coef=beta, baseline_scores=baseline))
    per_row = [r - b for r, b in zip(_naive_seq_rewards(scores, kl, lengths, beta), baseline.tolist())]
    assert returns is None
    assert torch.allclose(adv, _broadcast_rows(per_row, lengths, mask.shape[1]), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,gamma,lam", [(0.0, 1.0, 0.95), (0.1, 0.9, 0.8)])
def test_gae_estimator_matches_naive_loop(seed, beta, gamma, lam):
    scores, lengths, mask, kl, values = _batch(seed, 5, 1)
    adv, returns = get_estimator("gae").fn(
        AdvantageInput(scores, mask, kl=kl, kl_coef=beta, values=values, gamma=gamma, lam=lam))
    ref_adv, ref_returns = _naive_gae_estimator(scores, kl, values, lengths, beta, gamma, lam, mask.shape[1])
    assert torch.allclose(adv, ref_adv, atol=1e-12)
    assert torch.allclose(returns, ref_returns, atol=1e-12)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_the_loops_gae_advantages_are_exactly_ppos_before_the_estimator_registry(kl_estimator):
    """The RL loop's step 3 (`ppo.advantages`, through the registry) against what PPO's loop computed
    before the methods shared it, written out: k-estimate x mask, per-token rewards, optional reward
    whitening, GAE, optional advantage whitening. Bit-identical, so PPO's numbers did not move."""
    from align.config import PPOConfig
    from align.generation import Rollout
    from align.ppo import Experience, advantages

    g = torch.Generator().manual_seed(3)
    B, T, beta = 6, 7, 0.05
    mask = lengths_to_mask(torch.tensor([7, 3, 0, 5, 1, 6]), T)
    logprobs = -torch.rand(B, T, generator=g)
    ref_logprobs = -torch.rand(B, T, generator=g)
    values = torch.randn(B, T, generator=g) * mask  # the loop masks its values
    scores = torch.randn(B, generator=g)
    rollout = Rollout(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long),
                      torch.zeros(B, T, dtype=torch.long), mask.long(), torch.ones(B, dtype=torch.bool))
    for whiten in (False, True):
        for whiten_rewards in (False, True):
            cfg = PPOConfig()
            cfg.ppo.kl_estimator, cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.whiten_advantages = kl_estimator, 0.97, 0.9, whiten
            cfg.reward.whiten = whiten_rewards
            exp = Experience(rollout, [], [], scores, scores, ref_logprobs, logprobs=logprobs, values=values)
            advantages(exp, cfg, beta, None)
            m = mask.float()
            kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * m
            rewards, _ = per_token_rewards(scores, kl, m, beta)
            if whiten_rewards:
                rewards = masked_whiten(rewards, m, shift_mean=False)
            adv, returns = gae(rewards, values, m, 0.97, 0.9)
            assert torch.equal(exp.advantages, masked_whiten(adv, m) if whiten else adv)
            assert torch.equal(exp.returns, returns) and torch.equal(exp.kl, kl)


def test_estimators_are_zero_on_padding_and_ignore_kl_without_beta():
    scores, lengths, mask, kl, values = _batch(4, 3, 2)
    base = dict(scores=scores, response_mask=mask, group_size=2, values=values, baseline_scores=scores.flip(0))
    for name, est in ESTIMATORS.items():
        adv, returns = est.fn(AdvantageInput(**base, kl=kl, kl_coef=0.5))
        assert torch.all(adv[~mask] == 0), name
        if returns is not None:
            assert torch.all(returns[~mask] == 0), name
        # kl given but beta 0 (the KL in the loss): the same advantages as without it
        assert torch.equal(est.fn(AdvantageInput(**base, kl=kl))[0], est.fn(AdvantageInput(**base))[0]), name


# --------------------------------------------------------------------------------------------
# estimators on hand-computed numbers
# --------------------------------------------------------------------------------------------


def test_grpo_hand_values_unbiased_std():
    # groups of 2: [0, 4] mean 2, unbiased std sqrt((4 + 4) / 1) = 2 sqrt 2 -> -+1/sqrt 2
    #              [5, 5] all equal -> 0 (std 0, eps keeps it finite)
    # (the biased std, 2, would give -+1: this pins the convention)
    scores = torch.tensor([0.0, 4.0, 5.0, 5.0], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2, 1, 3, 0]), 3)
    # a tiny eps: [5, 5] gives 0 / eps, not 0 / 0
    adv, _ = get_estimator("grpo").fn(AdvantageInput(scores, mask, group_size=2, eps=1e-12))
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[-s, -s, 0], [s, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=F64)
    assert torch.allclose(adv, expected, atol=1e-9)

    # TRL's placement: / (std + 1e-4), eps outside the square root
    adv, _ = get_estimator("grpo").fn(AdvantageInput(scores, mask, group_size=2, eps=1e-4))
    assert adv[1, 0].item() == pytest.approx(2 / (2 * math.sqrt(2) + 1e-4), rel=1e-12)

    # a group of 3: [1, 2, 3], mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + eps)
    adv, _ = get_estimator("grpo").fn(
        AdvantageInput(torch.tensor([1.0, 2.0, 3.0], dtype=F64), torch.ones(3, 1), group_size=3, eps=0.5))
    assert adv[:, 0].tolist() == pytest.approx([-1 / 1.5, 0.0, 1 / 1.5])


def test_grpo_kl_in_reward_hand_values():
    # beta 0.5, kl sums 0.2 + 0.4 = 0.6 and 2.0 (the 9.0 is padding): r = [1 - 0.3, 2 - 1.0] = [0.7, 1.0]
    # mean 0.85, unbiased std sqrt(2 * 0.15**2) = 0.15 sqrt 2 -> -+1/sqrt 2
    scores = torch.tensor([1.0, 2.0], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2, 1]), 2)
    kl = torch.tensor([[0.2, 0.4], [2.0, 9.0]], dtype=F64)
    adv, _ = get_estimator("grpo").fn(AdvantageInput(scores, mask, group_size=2, kl=kl, kl_coef=0.5, eps=0.0))
    s = 1 / math.sqrt(2)
    assert _close(adv, [[-s, -s], [s, 0.0]])


def test_dr_grpo_and_rloo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 8.0], dtype=F64)
    mask = torch.ones(6, 1)
    adv, _ = get_estimator("dr_grpo").fn(AdvantageInput(scores, mask, group_size=3))
    assert adv[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0, -4.0, 0.0, 4.0])
    # rloo: 1 - (2 + 3)/2, 2 - (1 + 3)/2, 3 - (1 + 2)/2; 0 - 6, 4 - 4, 8 - 2
    adv, _ = get_estimator("rloo").fn(AdvantageInput(scores, mask, group_size=3))
    assert adv[:, 0].tolist() == pytest.approx([-1.5, 0.0, 1.5, -6.0, 0.0, 6.0])


def test_rloo_kl_in_reward_hand_values():
    # beta 0.5: r = [1 - 0.5 * 0.6, 3 - 0.5 * 0.6] = [0.7, 2.7]; n = 2: A = [0.7 - 2.7, 2.7 - 0.7]
    scores = torch.tensor([1.0, 3.0], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2, 1]), 2)
    kl = torch.tensor([[0.2, 0.4], [0.6, 5.0]], dtype=F64)
    adv, _ = get_estimator("rloo").fn(AdvantageInput(scores, mask, group_size=2, kl=kl, kl_coef=0.5))
    assert _close(adv, [[-2.0, -2.0], [2.0, 0.0]])


def test_remax_hand_values():
    # r = [0.7, 2.7] as above; greedy baselines [2, 2] enter without a KL term -> [-1.3, 0.7]
    scores = torch.tensor([1.0, 3.0], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2, 1]), 2)
    kl = torch.tensor([[0.2, 0.4], [0.6, 5.0]], dtype=F64)
    adv, _ = get_estimator("remax").fn(AdvantageInput(
        scores, mask, kl=kl, kl_coef=0.5, baseline_scores=torch.tensor([2.0, 2.0], dtype=F64)))
    assert _close(adv, [[-1.3, -1.3], [0.7, 0.0]])


def test_reinforce_pp_hand_values():
    # beta 0.5. Row 0 (2 tokens, score 1, kl [0.2, 0.4]): r = [-0.1, -0.2 + 1] = [-0.1, 0.8]
    # Row 1 (1 token, score -1, kl [0.6]): r = [-0.3 - 1] = [-1.3]. Row 2: empty.
    scores = torch.tensor([1.0, -1.0, 7.0], dtype=F64)
    mask = lengths_to_mask(torch.tensor([2, 1, 0]), 2)
    kl = torch.tensor([[0.2, 0.4], [0.6, 3.0], [3.0, 3.0]], dtype=F64)
    inp = AdvantageInput(scores, mask, kl=kl, kl_coef=0.5)
    adv, returns = get_estimator("reinforce_pp").fn(inp)
    # gamma 1: G = [0.7, 0.8], [-1.3]; whitened over the 3 tokens: mean 0.2/3, unbiased var 1.40333...
    assert _close(returns, [[0.7, 0.8], [-1.3, 0.0], [0.0, 0.0]])
    mean = 0.2 / 3
    std = math.sqrt(((0.7 - mean) ** 2 + (0.8 - mean) ** 2 + (-1.3 - mean) ** 2) / 2 + 1e-8)
    assert std == pytest.approx(math.sqrt(1.403333333), rel=1e-6)
    assert _close(adv, [[(0.7 - mean) / std, (0.8 - mean) / std], [(-1.3 - mean) / std, 0.0], [0.0, 0.0]])
    # gamma 0.5: G_0 = -0.1 + 0.5 * 0.8 = 0.3
    inp.gamma = 0.5
    _, returns = get_estimator("reinforce_pp").fn(inp)
    assert returns[0].tolist() == pytest.approx([0.3, 0.8])


def test_gae_estimator_hand_values():
    # beta 0.5, score 1, kl [0.2, 0.4] -> r = [-0.1, 0.8]; V = [0.5, 1.0]; gamma 1, lam 0.5
    # delta_1 = 0.8 - 1.0 = -0.2 = A_1; delta_0 = -0.1 + 1.0 - 0.5 = 0.4, A_0 = 0.4 + 0.5 * -0.2 = 0.3
    # returns = A + V = [0.8, 0.8]
    inp = AdvantageInput(torch.tensor([1.0], dtype=F64), torch.ones(1, 2),
                         kl=torch.tensor([[0.2, 0.4]], dtype=F64), kl_coef=0.5,
                         values=torch.tensor([[0.5, 1.0]], dtype=F64), gamma=1.0, lam=0.5)
    adv, returns = get_estimator("gae").fn(inp)
    assert _close(adv, [[0.3, -0.2]])
    assert _close(returns, [[0.8, 0.8]])


# --------------------------------------------------------------------------------------------
# estimator errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_reject_bad_group_sizes(kind):
    scores, mask = torch.zeros(6), torch.ones(6, 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        get_estimator(kind).fn(AdvantageInput(scores, mask, group_size=1))
    with pytest.raises(ValueError, match="not a whole number of groups"):
        get_estimator(kind).fn(AdvantageInput(scores, mask, group_size=4))
    get_estimator(kind).fn(AdvantageInput(scores, mask, group_size=3))  # 6 = 2 x 3 is fine


def test_estimators_reject_missing_inputs():
    scores, mask = torch.zeros(2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="baseline_scores"):
        get_estimator("remax").fn(AdvantageInput(scores, mask))
    with pytest.raises(ValueError, match="values"):
        get_estimator("gae").fn(AdvantageInput(scores, mask))


# --------------------------------------------------------------------------------------------
# policy loss: clip-higher, dual clip, the first step
# --------------------------------------------------------------------------------------------


def _logprobs_for(ratios, old_logprobs):
    return (old_logprobs + ratios.log()).requires_grad_(True)


def test_clip_higher_hand_values():
    # eps_low 0.2, eps_high 0.28: the ratio is clipped to [0.8, 1.28]. (ratio, A) -> L:
    #   (1.25, +1): inside [0.8, 1.28]  -> -1.25 (plain PPO's eps 0.2 would clip it to -1.2)
    #   (1.5,  +1): max(-1.5, -1.28)    -> -1.28 clipped high
    #   (0.5,  -2): max(1.0, 1.6)       ->  1.6  clipped low
    #   (0.5,  +1): max(-0.5, -0.8)     -> -0.5
    #   (1.5,  -2): max(3.0, 2.56)      ->  3.0
    #   (10,  100): padding             ->  0
    ratios = torch.tensor([[1.25, 1.5, 0.5], [0.5, 1.5, 10.0]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -2.0], [1.0, -2.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -3.0, -1.0]], dtype=F64)
    logprobs = _logprobs_for(ratios, old)

    loss_mat, stats = clipped_policy_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.28)

    assert _close(loss_mat, [[-1.25, -1.28, 1.6], [-0.5, 3.0, 0.0]])
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 5)
    assert stats["dual_clipfrac"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())
    # d L / d logp = -A * ratio where not clipped, 0 where clipped or padding
    loss_mat.sum().backward()
    assert _close(logprobs.grad, [[-1.25, 0.0, 0.0], [-0.5, 3.0, 0.0]])

    # eps_high None is eps_low: then (1.25, +1) is clipped to -1.2
    loss_mat, stats = clipped_policy_loss(logprobs, old, adv, mask, eps_low=0.2)
    assert loss_mat[0, 0].item() == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == pytest.approx(3 / 5)


def test_dual_clip_hand_values():
    # eps 0.2, clip_c 3. (ratio, A) -> L:
    #   (5, -1): max(5, 1.2) = 5, A < 0: min(5, 3)   -> 3    dual clipped (no gradient)
    #   (2, -1): max(2, 1.2) = 2, min(2, 3)          -> 2
    #   (4, +1): max(-4, -1.2)                       -> -1.2 clipped high; A > 0: no dual clip
    #   (0.5, -1): max(0.5, 0.8) = 0.8, min(0.8, 3)  -> 0.8  clipped low
    #   (1.5, +2): max(-3, -2.4)                     -> -2.4 clipped high
    ratios = torch.tensor([[5.0, 2.0, 4.0, 0.5, 1.5]], dtype=F64)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0, 2.0]], dtype=F64)
    old = torch.full((1, 5), -1.0, dtype=F64)
    mask = torch.ones(1, 5)
    logprobs = _logprobs_for(ratios, old)

    loss_mat, stats = clipped_policy_loss(logprobs, old, adv, mask, eps_low=0.2, clip_c=3.0)

    assert _close(loss_mat, [[3.0, 2.0, -1.2, 0.8, -2.4]])
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac"].item() == pytest.approx(3 / 5)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac_high"].item() == pytest.approx(2 / 5)
    loss_mat.sum().backward()
    assert _close(logprobs.grad, [[0.0, 2.0, 0.0, 0.0, 0.0]])

    without, _ = clipped_policy_loss(logprobs, old, adv, mask, eps_low=0.2)
    assert without[0, 0].item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="clip_c > 1"):
        clipped_policy_loss(logprobs, old, adv, mask, 0.2, clip_c=1.0)


def _naive_clipped_loss(ratio, adv, mask, eps_low, eps_high, clip_c):
    out = torch.zeros_like(ratio)
    for i in range(ratio.shape[0]):
        for t in range(ratio.shape[1]):
            if not mask[i, t]:
                continue
            r, a = ratio[i, t].item(), adv[i, t].item()
            loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if clip_c is not None and a < 0:
                loss = min(loss, -clip_c * a)
            out[i, t] = loss
    return out


@pytest.mark.parametrize("eps_high,clip_c", [(None, None), (0.28, None), (0.28, 3.0)])
def test_clipped_policy_loss_matches_naive_loop(eps_high, clip_c):
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 6, generator=g, dtype=F64)
    logprobs = old + 1.5 * torch.randn(4, 6, generator=g, dtype=F64)  # ratios from ~0.01 to ~100
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    mask = lengths_to_mask(torch.tensor([6, 2, 0, 4]), 6)
    loss_mat, _ = clipped_policy_loss(logprobs, old, adv, mask, 0.2, eps_high, clip_c)
    expected = _naive_clipped_loss((logprobs - old).exp(), adv, mask, 0.2, eps_high or 0.2, clip_c)
    assert torch.allclose(loss_mat, expected, atol=1e-12)


def test_policy_loss_is_token_mean_of_clipped_policy_loss():
    g = torch.Generator().manual_seed(6)
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    mask = lengths_to_mask(torch.tensor([5, 1, 3]), 5)
    logprobs = (old + 0.5 * torch.randn(3, 5, generator=g, dtype=F64)).requires_grad_(True)
    loss, stats = policy_loss(logprobs, old, adv, mask, 0.2)
    loss_mat, mat_stats = clipped_policy_loss(logprobs, old, adv, mask, 0.2, 0.2)
    assert torch.equal(loss, masked_mean(loss_mat, mask))
    assert torch.equal(loss, agg_loss(loss_mat, mask, "token-mean"))
    assert set(stats) == {"clipfrac", "approxkl", "ratio", "ratio_var"}
    assert all(torch.equal(stats[k], mat_stats[k]) for k in stats)
    assert 0 < stats["clipfrac"].item() < 1  # the example exercises the clip


def test_first_step_ratio_is_one_and_kl_to_itself_is_zero():
    g = torch.Generator().manual_seed(7)
    logp = -5 * torch.rand(3, 4, generator=g, dtype=F64)
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    mask = lengths_to_mask(torch.tensor([4, 2, 0]), 4)
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(logp, logp.clone(), kind) == 0), kind
    for eps_high, clip_c in ((None, None), (0.28, None), (0.28, 3.0)):
        loss_mat, stats = clipped_policy_loss(logp, logp.clone(), adv, mask, 0.2, eps_high, clip_c)
        assert torch.equal(loss_mat, torch.where(mask, -adv, torch.zeros_like(adv)))
        assert stats["ratio"].item() == 1.0 and stats["ratio_var"].item() == 0.0
        assert stats["clipfrac"].item() == 0.0 and stats["dual_clipfrac"].item() == 0.0
        assert stats["approxkl"].item() == 0.0


# --------------------------------------------------------------------------------------------
# loss aggregation
# --------------------------------------------------------------------------------------------


def test_agg_loss_hand_values():
    # rows of 3, 1 and 0 response tokens; padding holds 100 and inf, which must not leak
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("inf")], [100.0, 100.0, 100.0]], dtype=F64)
    mask = lengths_to_mask(torch.tensor([3, 1, 0]), 3)
    assert agg_loss(loss_mat, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1 + 0) / 3)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx(10 / 3)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (3 * 3))
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(10 / 15)
    # global counts replace this batch's own
    assert agg_loss(loss_mat, mask, "token-mean", global_tokens=8).item() == pytest.approx(10 / 8)
    assert agg_loss(loss_mat, mask, "seq-mean-token-sum", global_seqs=5).item() == pytest.approx(10 / 5)
    # no response token at all: 0, not NaN
    assert agg_loss(loss_mat, torch.zeros(3, 3), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(loss_mat, mask, "sum")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_sum_over_micro_batches_equals_whole(mode, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 10, 6
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[:2] = 0  # empty rows count as sequences
    mask = lengths_to_mask(lengths, T)
    loss_mat = torch.randn(B, T, generator=g, dtype=F64)
    whole = agg_loss(loss_mat, mask, mode)

    order = torch.randperm(B, generator=g)
    cuts = sorted(torch.randperm(B - 1, generator=g)[:3].add(1).tolist())
    pieces = [order[a:b] for a, b in zip([0, *cuts], [*cuts, B])]
    counts = dict(global_tokens=mask.sum(), global_seqs=B, max_len=T)
    total = sum(agg_loss(loss_mat[idx], mask[idx], mode, **counts) for idx in pieces)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)

    # micro-batches trimmed to their own longest row (as a packer would): the same, with max_len given
    trimmed = sum(agg_loss(loss_mat[idx, :max(int(lengths[idx].max()), 1)],
                           mask[idx, :max(int(lengths[idx].max()), 1)], mode, **counts) for idx in pieces)
    assert trimmed.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)

    # without the global counts the split changes the result: the counts are what makes it exact
    naive = sum(agg_loss(loss_mat[idx], mask[idx], mode) for idx in pieces) / len(pieces)
    assert naive.item() != pytest.approx(whole.item(), rel=1e-6)


def test_agg_loss_gradient_is_split_invariant():
    g = torch.Generator().manual_seed(9)
    mask = lengths_to_mask(torch.tensor([5, 0, 2, 4, 1, 3]), 5)
    loss_mat = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    for mode in LOSS_AGG_MODES:
        (whole,) = torch.autograd.grad(agg_loss(loss_mat, mask, mode), loss_mat)
        counts = dict(global_tokens=mask.sum(), global_seqs=6)
        parts = agg_loss(loss_mat[:2], mask[:2], mode, **counts) + agg_loss(loss_mat[2:], mask[2:], mode, **counts)
        (split,) = torch.autograd.grad(parts, loss_mat)
        assert torch.allclose(whole, split, atol=1e-15), mode
        assert torch.all(whole[~mask] == 0), mode


# --------------------------------------------------------------------------------------------
# DAPO: dynamic sampling and overlong penalty
# --------------------------------------------------------------------------------------------


def test_zero_variance_groups():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0 + 1e-9, 0.0, 0.0, 0.0], dtype=F64)
    assert zero_variance_groups(scores, 3).tolist() == [True, False, False, True]
    assert zero_variance_groups(scores, 3, atol=1e-6).tolist() == [True, False, True, True]
    # pairs (1, 1) (1, 0) (1, 0) (2, 2) (2 + 1e-9, 0) (0, 0)
    assert zero_variance_groups(scores, 2).tolist() == [True, False, False, True, False, True]
    with pytest.raises(ValueError, match="not a whole number"):
        zero_variance_groups(scores, 5)
    with pytest.raises(ValueError, match="group_size >= 2"):
        zero_variance_groups(scores, 1)


def test_overlong_penalty_hand_values():
    # max_len 10, buffer 4: free up to 6, then -1/4 per token, -1 at 10 and beyond
    lengths = torch.tensor([0, 6, 7, 8, 9, 10, 12])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    assert overlong_penalty(lengths, 10, 4, factor=0.5).tolist() == pytest.approx(
        [0, 0, -0.125, -0.25, -0.375, -0.5, -0.5])
    assert overlong_penalty(lengths, 10, 1).tolist() == pytest.approx([0, 0, 0, 0, 0, -1.0, -1.0])
    for bad in (0, 11):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, 10, bad)


# --------------------------------------------------------------------------------------------
# sampler / trainer correction
# --------------------------------------------------------------------------------------------


def _mismatch_example():
    # trainer / sampler probability ratios; the 10 is padding
    ratios = torch.tensor([[0.5, 1.0, 1.5, 3.0], [2.5, 10.0, 1.0, 1.0]], dtype=F64)
    sampler = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.1, -1.0, -1.0]], dtype=F64)
    trainer = (sampler + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    return trainer, sampler, mask


def test_rollout_correction_hand_values():
    trainer, sampler, mask = _mismatch_example()
    tis = rollout_correction(trainer, sampler, mask, "tis", cap=2.0)
    assert _close(tis, [[0.5, 1.0, 1.5, 2.0], [2.0, 0.0, 0.0, 0.0]])
    mis = rollout_correction(trainer, sampler, mask, "mis", cap=2.0)
    assert _close(mis, [[0.5, 1.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert not tis.requires_grad and not mis.requires_grad
    with pytest.raises(ValueError, match="tis"):
        rollout_correction(trainer, sampler, mask, "is", cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        rollout_correction(trainer, sampler, mask, "tis", cap=0.0)


def test_logprob_diff_stats_hand_values():
    trainer, sampler, mask = _mismatch_example()
    stats = logprob_diff_stats(trainer, sampler, mask)
    diffs = [math.log(2), 0.0, math.log(1.5), math.log(3), math.log(2.5)]  # |log ratio|, padding out
    assert stats["logprob_diff_mean"].item() == pytest.approx(sum(diffs) / 5)
    assert stats["logprob_diff_max"].item() == pytest.approx(math.log(3))  # not the padding's log 10
    assert stats["ratio_outside_0.9_1.1"].item() == pytest.approx(4 / 5)
    assert all(not v.requires_grad for v in stats.values())
