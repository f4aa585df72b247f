"""align.stats on hand-computed cases and planted effects; no model is trained or loaded."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from align.stats import (bootstrap_ci, exact_sign_test, hierarchical_bootstrap_ci, paired_difference, parse_seeds,
                         prompt_bootstrap_ci, seed_level_difference, t_interval, t_quantile)

REPO = Path(__file__).resolve().parents[1]


def bernoulli(p: float, seeds: int, prompts: int, rng_seed: int) -> list[list[float]]:
    """[seed][prompt] 0/1 scores, fixed by `rng_seed`."""
    rng = np.random.default_rng(rng_seed)
    return (rng.random((seeds, prompts)) < p).astype(float).tolist()


def test_modules_do_not_import_torch() -> None:
    code = "import align.stats, align.expect, sys; assert 'torch' not in sys.modules; " \
           "assert 'transformers' not in sys.modules; assert 'scipy' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_single_seed_has_no_interval() -> None:
    for ci in (bootstrap_ci([0.7]), t_interval([0.7]), prompt_bootstrap_ci([0.7])):
        assert (ci.mean, ci.low, ci.high, ci.n) == (0.7, 0.7, 0.7, 1)
        assert "no interval" in ci.method
    assert bootstrap_ci([0.7]).method == "single seed: no interval"


def test_no_values_raise() -> None:
    with pytest.raises(ValueError, match="no seeds"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="no seeds"):
        t_interval([])
    with pytest.raises(ValueError, match="no seeds"):
        hierarchical_bootstrap_ci([])
    with pytest.raises(ValueError, match="seed 1: no prompts"):
        hierarchical_bootstrap_ci([[1.0], []])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([1.0, float("nan")])


@pytest.mark.parametrize("value", [0.5, 0.1, 0.7, 1 / 3])
def test_equal_values_give_a_zero_width_interval(value: float) -> None:
    for ci in (bootstrap_ci([value] * 7), prompt_bootstrap_ci([value] * 200),
               hierarchical_bootstrap_ci([[value] * 50] * 4), t_interval([value] * 7)):
        assert ci.low == ci.high == ci.mean == pytest.approx(value, abs=1e-15), ci


def test_bootstrap_on_two_values() -> None:
    # Resampling [0, 1] twice gives means 0, 0.5 and 1 with probabilities 1/4, 1/2, 1/4: at 95% the
    # 2.5% and 97.5% quantiles are 0 and 1, and at 40% the 30% and 70% quantiles are both 0.5.
    assert bootstrap_ci([0.0, 1.0]).low == 0.0 and bootstrap_ci([0.0, 1.0]).high == 1.0
    ci = bootstrap_ci([0.0, 1.0], level=0.4)
    assert (ci.mean, ci.low, ci.high, ci.n) == (0.5, 0.5, 0.5, 2)
    assert ci.method == "percentile bootstrap over 2 seeds, 40%, 10000 resamples"
    assert prompt_bootstrap_ci([0.0, 1.0]).method.startswith("percentile bootstrap over 2 prompts")


def test_bootstrap_is_deterministic_per_seed() -> None:
    values = np.random.default_rng(3).normal(size=20).tolist()
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)
    grid = bernoulli(0.5, 4, 30, rng_seed=0)
    assert hierarchical_bootstrap_ci(grid, seed=5) == hierarchical_bootstrap_ci(grid, seed=5)
    assert hierarchical_bootstrap_ci(grid, seed=5) != hierarchical_bootstrap_ci(grid, seed=6)
    assert paired_difference(grid, grid[::-1], seed=5) == paired_difference(grid, grid[::-1], seed=5)


def test_bootstrap_agrees_with_t_on_normal_data() -> None:
    values = np.random.default_rng(0).normal(1.0, 2.0, size=60).tolist()
    boot, t = bootstrap_ci(values), t_interval(values)
    assert boot.mean == t.mean
    assert boot.high - boot.low == pytest.approx(t.high - t.low, rel=0.1)
    assert boot.low < boot.mean < boot.high


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 10, 2.2281), (0.975, 30, 2.0423),
    (0.995, 4, 4.6041), (0.995, 29, 2.7564), (0.95, 10, 1.8125), (0.9995, 1, 636.6192), (0.975, 10**6, 1.9600),
])
def test_t_quantile_matches_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.55, 0.8, 0.975, 0.999])
def test_t_quantile_matches_closed_forms(p: float) -> None:
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)


def test_t_interval_by_hand() -> None:
    # mean 3, s = sqrt(2.5), s / sqrt(5) = sqrt(0.5); t_{0.975,4} = 2.776445
    ci = t_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert (ci.mean, ci.n) == (3.0, 5)
    assert ci.low == pytest.approx(3 - half, abs=1e-8) and ci.high == pytest.approx(3 + half, abs=1e-8)
    assert ci.method == "Student-t interval over 5 seeds, 95%"


@pytest.mark.parametrize(("wins", "losses", "p"), [
    (5, 0, 2 / 32), (0, 5, 2 / 32), (3, 3, 1.0), (0, 0, 1.0), (1, 0, 1.0), (6, 0, 2 / 64),
    (4, 1, 2 * 6 / 32), (10, 2, 2 * (1 + 12 + 66) / 4096), (2, 1, 1.0),
])
def test_exact_sign_test_by_hand(wins: int, losses: int, p: float) -> None:
    assert exact_sign_test(wins, losses) == pytest.approx(p, rel=1e-12)


def test_sign_test_of_many_pairs_is_finite() -> None:
    assert 0 < exact_sign_test(5200, 4800) < 1e-4
    assert exact_sign_test(5000, 5000) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        exact_sign_test(-1, 2)


def test_paired_difference_counts_wins_losses_ties() -> None:
    method = [[1.0, 0.5, 0.2], [0.3, 0.3 + 1e-12, 0.9]]
    baseline = [[0.0, 0.5, 0.4], [0.1, 0.3, 0.9]]
    c = paired_difference(method, baseline, n_boot=200)
    assert (c.wins, c.losses, c.ties) == (2, 1, 3)
    assert c.sign_test_p == 1.0  # 2 vs 1
    assert c.mean_diff == pytest.approx(((1.0 + 0 - 0.2) / 3 + (0.2 + 0 + 0) / 3) / 2)
    assert not c.significant


def test_all_ties_give_p_one() -> None:
    grid = bernoulli(0.5, 3, 20, rng_seed=1)
    c = paired_difference(grid, grid)
    assert (c.wins, c.losses, c.ties) == (0, 0, 60)
    assert (c.mean_diff, c.low, c.high, c.sign_test_p, c.significant) == (0.0, 0.0, 0.0, 1.0, False)


def test_planted_difference_is_significant() -> None:
    c = paired_difference(bernoulli(0.7, 5, 200, rng_seed=1), bernoulli(0.5, 5, 200, rng_seed=2))
    assert c.significant
    assert 0 < c.low < 0.2 < c.high
    assert c.sign_test_p < 1e-6
    assert c.wins + c.losses + c.ties == 1000
    assert "hierarchical" in c.method and "significant = interval excludes 0 and sign test p < 0.05" in c.method


def test_planted_null_is_not_significant() -> None:
    c = paired_difference(bernoulli(0.5, 5, 200, rng_seed=3), bernoulli(0.5, 5, 200, rng_seed=4))
    assert not c.significant
    assert c.low < 0 < c.high
    assert c.sign_test_p > 0.05


def test_significance_needs_both_interval_and_sign_test() -> None:
    # Four seeds win every prompt by a hair, one loses every prompt by a lot: the sign test is sure
    # (80 wins, 20 losses), but a third of the seed resamples miss the bad seed, so the interval holds 0.
    method = [[-1.0] * 20] + [[0.01] * 20] * 4
    baseline = [[0.0] * 20] * 5
    c = paired_difference(method, baseline)
    assert (c.wins, c.losses) == (80, 20) and c.sign_test_p < 1e-6
    assert c.low < 0 < c.high
    assert not c.significant
    # Five seeds all better: the interval excludes 0, but the sign test cannot go below 2/32.
    s = seed_level_difference([1.0, 1.1, 1.2, 1.3, 1.4], [0.0] * 5)
    assert s.low > 0 and s.sign_test_p == 0.0625 and not s.significant
    six = seed_level_difference([1.0, 1.1, 1.2, 1.3, 1.4, 1.5], [0.0] * 6)
    assert six.low > 0 and six.sign_test_p == 0.03125 and six.significant


def test_seed_level_difference_by_hand() -> None:
    c = seed_level_difference([3.0, 2.0, 5.0, 1.0], [1.0, 2.0, 1.0, 2.0])
    assert (c.mean_diff, c.wins, c.losses, c.ties) == (1.25, 2, 1, 1)
    assert c.sign_test_p == 1.0 and not c.significant
    assert c.low >= -1.0 and c.high <= 4.0  # within the smallest and largest difference
    assert "over 4 seeds" in c.method
    with pytest.raises(ValueError, match="method has 2 seeds, baseline 3"):
        seed_level_difference([1, 2], [1, 2, 3])


def test_paired_difference_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="method has 1 seeds, baseline 2"):
        paired_difference([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="seed 1: method has 2 prompts, baseline 3"):
        paired_difference([[1.0], [1.0, 2.0]], [[1.0], [1.0, 2.0, 3.0]])


def test_hierarchical_is_wider_than_prompt_only_when_seeds_differ() -> None:
    rng = np.random.default_rng(7)
    grid = [(rng.random(200) < p).astype(float).tolist() for p in (0.2, 0.35, 0.5, 0.65, 0.8)]
    hier = hierarchical_bootstrap_ci(grid)
    pooled = prompt_bootstrap_ci([v for seed in grid for v in seed])
    assert hier.mean == pytest.approx(pooled.mean)
    assert hier.high - hier.low > 3 * (pooled.high - pooled.low)
    assert hier.n == 5 and pooled.n == 1000
    assert "over 5 seeds, then 200 prompts" in hier.method


def test_hierarchical_weighs_every_seed_the_same() -> None:
    ci = hierarchical_bootstrap_ci([[1.0], [0.0, 0.0, 0.0]], n_boot=100)
    assert ci.mean == 0.5  # the mean of seed means, not of the 4 pooled prompts (0.25)
    assert "then 1-3 prompts within each" in ci.method


def test_hierarchical_resamples_prompts_within_seeds() -> None:
    # Identical seeds: a seeds-only bootstrap would have zero width; the prompts still spread.
    one = bernoulli(0.5, 1, 100, rng_seed=8)[0]
    hier = hierarchical_bootstrap_ci([one] * 5)
    assert hier.high - hier.low > 0.03
    single = hierarchical_bootstrap_ci([one])
    assert "single seed" in single.method and single.high > single.low


def test_level_is_validated() -> None:
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


@pytest.mark.parametrize(("text", "seeds"), [
    ("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]), ("3", [3]), ("0-2,7", [0, 1, 2, 7]), (" 1 , 3-4 ", [1, 3, 4]),
    ("5,1", [5, 1]), ("2-2", [2]), ("4294967295", [4294967295]),
])
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(("text", "message"), [
    ("4-0", "range '4-0' is reversed; write '0-4'"), ("-1", "'-1' is negative"), ("1.5", "'1.5' is not a seed"),
    ("a", "'a' is not a seed"), ("0,0", "seed 0 is given twice"), ("0-3,2", "seed 2 is given twice"),
    ("4294967296", "above the largest seed"), ("0-4294967296", "above the largest seed"), ("", "none given"),
    ("1,,2", "'' is not a seed"),
])
def test_parse_seeds_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_seeds(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_best_of_n_estimate_by_hand() -> None:
    from align.stats import best_of_n_estimate

    # sorted by score: 1 -> 20, 2 -> 30, 3 -> 10. n = 2: the subsets {3,1}, {3,2} keep 10, {1,2} keeps 30
    scores, values = [3.0, 1.0, 2.0], [10.0, 20.0, 30.0]
    assert best_of_n_estimate(scores, values, 1) == pytest.approx(20.0)  # the plain mean
    assert best_of_n_estimate(scores, values, 2) == pytest.approx(50 / 3)
    assert best_of_n_estimate(scores, values, 3) == pytest.approx(10.0)  # the top score's value


def test_best_of_n_estimate_breaks_ties_evenly() -> None:
    from align.stats import best_of_n_estimate

    # n = 2 subsets: {a, b} tie -> (4 + 8) / 2, {a, c} -> 4, {b, c} -> 8: mean 6, whatever the tied order
    assert best_of_n_estimate([1.0, 1.0, 0.0], [4.0, 8.0, 0.0], 2) == pytest.approx(6.0)
    assert best_of_n_estimate([1.0, 1.0, 0.0], [8.0, 4.0, 0.0], 2) == pytest.approx(6.0)
    assert best_of_n_estimate([5.0, 5.0, 5.0], [1.0, 0.0, 0.0], 3) == pytest.approx(1 / 3)


def test_best_of_n_estimate_is_the_mean_over_subsets() -> None:
    from itertools import combinations

    from align.stats import best_of_n_estimate

    rng = np.random.default_rng(4)
    scores, values = rng.normal(size=9), rng.random(9)
    for n in (1, 2, 4, 9):
        subsets = list(combinations(range(9), n))
        brute = np.mean([values[max(c, key=lambda i: scores[i])] for c in subsets])
        assert best_of_n_estimate(scores, values, n) == pytest.approx(brute)


def test_best_of_n_estimate_rejects() -> None:
    from align.stats import best_of_n_estimate

    with pytest.raises(ValueError, match="1 <= n"):
        best_of_n_estimate([1.0, 2.0], [0.0, 1.0], 3)
    with pytest.raises(ValueError, match="2 scores for 1 values"):
        best_of_n_estimate([1.0, 2.0], [0.0], 1)
