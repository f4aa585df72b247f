"""Tests for align.rl: hand-computed PPO losses, GAE against a naive loop, KL estimators,
per-token rewards, KL controllers, EOS truncation and the Bradley-Terry loss."""

from __future__ import annotations

import math

import pytest
import torch

from align.ops import lengths_to_mask
from align.rl import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    first_true_index,
    gae,
    kl_estimate,
    per_token_rewards,
    policy_loss,
    truncate_after_eos,
    value_loss,
)

# --------------------------------------------------------------------------------------------
# policy loss
# --------------------------------------------------------------------------------------------


def test_policy_loss_hand_example():
    eps = 0.2
    # six tokens, the last one masked out. (ratio, advantage) -> max(-A r, -A clip(r)):
    #   (1.5, +1):  -1.5 vs -1.2 -> -1.2  clipped
    #   (0.5, +1):  -0.5 vs -0.8 -> -0.5  not clipped (ratio low, advantage positive)
    #   (0.5, -2):   1.0 vs  1.6 ->  1.6  clipped
    #   (1.5, -2):   3.0 vs  2.4 ->  3.0  not clipped (ratio high, advantage negative)
    #   (1.1, +3):  -3.3 vs -3.3 -> -3.3  inside the range, not clipped
    #   (10., 100): masked out
    ratios = torch.tensor([[1.5, 0.5, 0.5], [1.5, 1.1, 10.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -2.0], [-2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -3.0, -1.0]], dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)

    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, eps)

    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.6 + 3.0 - 3.3) / 5)  # -0.08
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    logratios = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), math.log(1.1)]
    assert stats["approxkl"].item() == pytest.approx(sum(0.5 * x**2 for x in logratios) / 5)
    assert stats["ratio"].item() == pytest.approx(5.1 / 5)
    # deviations from 1.02: .48, -.52, -.52, .48, .08 -> squares sum 1.008, unbiased / 4
    assert stats["ratio_var"].item() == pytest.approx(1.008 / 4)
    assert all(not v.requires_grad for v in stats.values())

    # d loss / d logp = -A * ratio / 5 where not clipped, 0 where clipped or masked
    loss.backward()
    expected_grad = torch.tensor([[0.0, -0.5 / 5, 0.0], [3.0 / 5, -3.3 / 5, 0.0]], dtype=torch.float64)
    assert torch.allclose(logprobs.grad, expected_grad)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = lengths_to_mask(torch.tensor([4, 2, 1]), 4)
    loss, stats = policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-adv[mask].mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0


# --------------------------------------------------------------------------------------------
# value loss
# --------------------------------------------------------------------------------------------


def _value_example():
    # (V, V_old, R), eps = 0.2, V_clip = clip(V, V_old - 0.2, V_old + 0.2):
    #   (1.0, 0.5, 0.0): V_clip 0.7, err 1.00, err_clip 0.49 -> 1.00 (unclipped larger)
    #   (1.0, 0.5, 2.0): V_clip 0.7, err 1.00, err_clip 1.69 -> 1.69 (clipped larger)
    #   (0.4, 0.5, 0.0): V_clip 0.4, err 0.16, err_clip 0.16 -> 0.16 (inside the range)
    #   (100, 0.0, 0.0): masked out
    values = torch.tensor([[1.0, 1.0], [0.4, 100.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.5, 0.5], [0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    return values, old_values, returns, mask


def test_value_loss_clipped_hand_example():
    values, old_values, returns, mask = _value_example()
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69 + 0.16) / 3)  # 0.475
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["vpred"].item() == pytest.approx((1.0 + 1.0 + 0.4) / 3)
    assert stats["error"].item() == pytest.approx((1.0 + 1.0 + 0.16) / 3)


def test_value_loss_unclipped_hand_example():
    values, old_values, returns, mask = _value_example()
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.16) / 3)  # 0.36
    assert stats["clipfrac"].item() == 0.0
    assert stats["error"].item() == pytest.approx(0.72)


def test_value_loss_gradient_is_zero_where_clipped_term_wins():
    values, old_values, returns, mask = _value_example()
    values = values.clone().requires_grad_(True)
    loss, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    loss.backward()
    # d/dV 0.5 * (V - R)^2 / 3 = (V - R) / 3 where the unclipped term is used
    expected = torch.tensor([[1.0 / 3, 0.0], [0.4 / 3, 0.0]], dtype=torch.float64)
    assert torch.allclose(values.grad, expected)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def _naive_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        n = int(lengths[i])
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
    returns = adv + values * lengths_to_mask(lengths, T)
    return adv, returns


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_naive_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage past the end too
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1  # always a full row and a one-token row
    mask = lengths_to_mask(lengths, T)

    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = _naive_gae(rewards, values, lengths, gamma, lam)

    assert torch.allclose(advantages, expected_adv)
    assert torch.allclose(returns, expected_ret)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)


def test_gae_hand_example():
    # one row of 2 tokens (+1 padding), gamma = 0.5, lam = 0.5
    rewards = torch.tensor([[1.0, 2.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # t=1: delta = 2 + 0 - 1 = 1, A = 1
    # t=0: delta = 1 + 0.5 * 1 - 0.5 = 1, A = 1 + 0.25 * 1 = 1.25
    assert torch.allclose(advantages, torch.tensor([[1.25, 1.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.75, 2.0, 0.0]]))


# --------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# --------------------------------------------------------------------------------------------


def test_kl_estimators_on_specific_numbers():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    # logr = ref - logp = [-0.5, 1.0, 0.0]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.125, 0.5, 0.0], dtype=torch.float64))
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0], dtype=torch.float64)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), k3)
    assert torch.allclose(k3, torch.tensor([0.10653066, 0.71828183, 0.0], dtype=torch.float64))


def test_kl_estimator_unknown_kind_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_k3_and_k2_are_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = 5 * torch.randn(1000, generator=g)
    ref = 5 * torch.randn(1000, generator=g)
    assert torch.all(kl_estimate(logp, ref, "k3") >= 0)
    assert torch.all(kl_estimate(logp, ref, "k2") >= 0)
    assert torch.any(kl_estimate(logp, ref, "k1") < 0)


def test_k1_and_k3_are_unbiased_for_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_per_token_rewards_score_on_last_response_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    lengths = torch.tensor([3, 1, 4, 0])  # the last row has no response token
    T, beta = 4, 0.1
    mask = lengths_to_mask(lengths, T)
    kl = torch.arange(1.0, 17.0).view(4, 4)

    rewards, non_score = per_token_rewards(scores, kl, mask, beta)

    expected_non_score = -beta * kl * mask
    expected = expected_non_score.clone()
    expected[0, 2] += 1.0
    expected[1, 0] += 2.0
    expected[2, 3] += 3.0
    expected[3, 0] += 4.0  # empty row: score at index 0 (documented)
    assert torch.allclose(non_score, expected_non_score)
    assert torch.allclose(rewards, expected)
    assert torch.all(non_score[~mask] == 0)
    # every score appears exactly once
    assert torch.allclose((rewards - non_score).sum(1), scores)


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_update_and_clip():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=7.0, n_steps=64)  # error = 7/6 - 1 = 1/6, inside the clip
    assert ctl.value == pytest.approx(0.1 * (1 + (1 / 6) * 64 / 10_000))

    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=60.0, n_steps=64)  # error 9 -> clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))

    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=0.0, n_steps=64)  # error -1 -> clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 64 / 10_000))


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    for kl in (1.0, 9.0, 12.0):
        ctl.update(kl, n_steps=8)
    resumed = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(7.0, 8)
    resumed.update(7.0, 8)
    assert resumed.value == ctl.value

    fixed = FixedKLController(value=0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(value=1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(value=0.1, target=0.0, horizon=10)


# --------------------------------------------------------------------------------------------
# EOS truncation
# --------------------------------------------------------------------------------------------


def test_first_true_index():
    bools = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert first_true_index(bools).tolist() == [1, 3, 0, 2]


def test_truncate_after_eos_hand_example():
    EOS, PAD = 2, 0
    responses = torch.tensor(
        [
            [5, 6, 2, 7, 8],  # EOS in the middle
            [5, 6, 7, 8, 2],  # EOS at the end
            [5, 6, 7, 8, 9],  # no EOS
            [2, 5, 6, 7, 8],  # EOS at position 0
            [5, 2, 2, 3, 3],  # two EOS: cut after the first
        ]
    )
    truncated, lengths, has_eos = truncate_after_eos(responses, EOS, PAD)
    assert truncated.tolist() == [
        [5, 6, 2, 0, 0],
        [5, 6, 7, 8, 2],
        [5, 6, 7, 8, 9],
        [2, 0, 0, 0, 0],
        [5, 2, 0, 0, 0],
    ]
    assert lengths.tolist() == [3, 5, 5, 1, 2]
    assert has_eos.tolist() == [True, True, False, True, True]
    assert responses[0, 3] == 7  # the input is not modified in place


def test_truncate_after_eos_with_pad_equal_to_eos():
    # pad == eos: lengths still come from the first EOS, not from counting non-pad tokens
    truncated, lengths, has_eos = truncate_after_eos(torch.tensor([[4, 2, 4, 4]]), 2, 2)
    assert truncated.tolist() == [[4, 2, 2, 2]]
    assert lengths.tolist() == [2]
    assert has_eos.tolist() == [True]


# --------------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------------


def test_bradley_terry_hand_values():
    loss, stats = bradley_terry_loss(torch.tensor([0.3, -1.0]), torch.tensor([0.3, -1.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["accuracy"].item() == 0.0  # ties are not correct
    assert stats["margin"].item() == pytest.approx(0.0)

    loss, stats = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(0.5)

    loss, stats = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)  # diff - margin = 1
    assert stats["accuracy"].item() == 1.0
    assert stats["margin"].item() == pytest.approx(2.0)
