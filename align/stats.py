"""The statistics of a multi-seed comparison: intervals for a mean, paired differences, sign tests.

Two kinds of unit are resampled, and every interval says which in its `method`:

    seeds    one number per training seed (a run's mean gold reward, its KL, its wall time)
    prompts  one number per eval prompt of one seed's model

A seed-level interval says how much the result moves when the model is retrained; a prompt-level
interval only how much it moves when other prompts are drawn for the same model, so it is the
narrower one and never stands in for the first. `hierarchical_bootstrap_ci` and `paired_difference`
resample both: seeds, then prompts within each resampled seed (Davison & Hinkley 1997, sec. 3.8).

Intervals are percentile bootstraps (Efron & Tibshirani 1993, ch. 13) unless named `t_interval`.
With few seeds the percentile bootstrap is too narrow (its spread is that of the sample, a factor
sqrt((n-1)/n) below the unbiased one), which is one reason significance also needs the sign test.

Pure numpy and the standard library: no torch, no scipy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

TIE_TOL = 1e-9
"""Two scores closer than this are a tie in the sign test."""
MAX_SEED = 2**32 - 1
"""The largest seed numpy's and torch's generators take."""
_MAX_DRAWS = 1 << 22
"""Resampled indices held in memory at once (32 MB of int64); larger bootstraps run in chunks."""


@dataclass(frozen=True)
class Interval:
    """A mean and an interval for it."""

    mean: float
    """The mean over the units (for a hierarchical interval: the mean over seeds of each seed's prompt mean)."""
    low: float
    high: float
    n: int
    """The number of units: seeds, or prompts for a prompt-level interval."""
    method: str
    """How the interval was made, naming the units, e.g. 'percentile bootstrap over 5 seeds, 95%, 10000 resamples'."""


@dataclass(frozen=True)
class Comparison:
    """A method against a baseline, paired unit by unit (prompt-seed pairs, or seeds)."""

    mean_diff: float
    """Mean of method - baseline: over seeds of each seed's mean over prompts, or over seeds."""
    low: float
    high: float
    """The percentile bootstrap interval of `mean_diff` at the requested level."""
    wins: int
    losses: int
    ties: int
    """Pairs where method > baseline, < baseline, and within TIE_TOL of it."""
    sign_test_p: float
    """Exact two-sided sign test of wins against losses, ties dropped; 1.0 when every pair ties."""
    significant: bool
    """The interval excludes 0 and sign_test_p < 1 - level: both the bootstrap and the sign test agree."""
    method: str


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10000, seed: int = 0,
                 unit: str = "seeds") -> Interval:
    """Percentile bootstrap interval of the mean of `values`, one value per unit (by default a seed).

    Resamples the units with replacement `n_boot` times and takes the (1 - level) / 2 and
    (1 + level) / 2 quantiles of the resampled means. One unit gives low == high == mean and says so
    in `method`; no units raises ValueError. Deterministic for a given `seed`.
    """
    x = _as_values(values, unit)
    _check_level(level, n_boot)
    mean = float(np.mean(x))
    if x.size == 1:
        return Interval(mean, mean, mean, 1, f"single {unit[:-1]}: no interval")
    boot = _resample_means(np.random.default_rng(seed), x, n_boot)
    low, high = _percentile(boot, level)
    return Interval(mean, low, high, x.size,
                    f"percentile bootstrap over {x.size} {unit}, {level:.0%}, {n_boot} resamples")


def prompt_bootstrap_ci(per_prompt: Sequence[float], level: float = 0.95, n_boot: int = 10000,
                        seed: int = 0) -> Interval:
    """Percentile bootstrap interval of one seed's mean over its prompts: the within-seed spread only.

    It says nothing of how a retrained model would score; use `bootstrap_ci` over seeds or
    `hierarchical_bootstrap_ci` for that.
    """
    return bootstrap_ci(per_prompt, level, n_boot, seed, unit="prompts")


def t_interval(values: Sequence[float], level: float = 0.95, unit: str = "seeds") -> Interval:
    """Student-t interval of the mean over the units: mean +- t_{(1+level)/2, n-1} * s / sqrt(n).

    `s` is the sample standard deviation (n - 1 in the denominator). It assumes the units are
    independent draws of a roughly normal quantity; one unit gives low == high == mean.
    """
    x = _as_values(values, unit)
    _check_level(level, 1)
    mean = float(np.mean(x))
    if x.size == 1:
        return Interval(mean, mean, mean, 1, f"single {unit[:-1]}: no interval")
    spread = float(np.std(x - x[0], ddof=1))  # the same s; shifting makes it exactly 0 when all values are equal
    half = t_quantile((1 + level) / 2, x.size - 1) * spread / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, x.size, f"Student-t interval over {x.size} {unit}, {level:.0%}")


def hierarchical_bootstrap_ci(per_seed_per_prompt: Sequence[Sequence[float]], level: float = 0.95,
                              n_boot: int = 10000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean over seeds of each seed's mean over prompts.

    Each resample draws seeds with replacement, then for every drawn seed its prompts with
    replacement, so the interval holds both the seed-to-seed and the prompt-to-prompt spread. Every
    seed weighs the same, whatever its number of prompts. One seed resamples prompts only.
    """
    groups = _as_groups(per_seed_per_prompt)
    _check_level(level, n_boot)
    mean = float(np.mean([g.mean() for g in groups]))
    boot = _hierarchical_means(np.random.default_rng(seed), groups, n_boot)
    low, high = _percentile(boot, level)
    return Interval(mean, low, high, len(groups), _hierarchical_method(groups, level, n_boot))


def paired_difference(method: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                      level: float = 0.95, n_boot: int = 10000, seed: int = 0, tol: float = TIE_TOL) -> Comparison:
    """Method against baseline on the same prompts, `[seed][prompt]` scores aligned pair by pair.

    `mean_diff` is the mean over seeds of each seed's mean over prompts of method - baseline; its
    interval is the hierarchical percentile bootstrap of that mean (seeds, then prompts), resampling
    the differences so each pair stays together. Wins, losses and ties count prompt-seed pairs, and
    the sign test runs on them; it treats the pairs as independent, which they are only within a
    seed, so significance also needs the interval, which does not.
    """
    m, b = _as_groups(method), _as_groups(baseline)
    if len(m) != len(b):
        raise ValueError(f"method has {len(m)} seeds, baseline {len(b)}")
    for s, (ms, bs) in enumerate(zip(m, b)):
        if ms.size != bs.size:
            raise ValueError(f"seed {s}: method has {ms.size} prompts, baseline {bs.size}")
    _check_level(level, n_boot)
    diffs = [ms - bs for ms, bs in zip(m, b)]
    mean = float(np.mean([d.mean() for d in diffs]))
    boot = _hierarchical_means(np.random.default_rng(seed), diffs, n_boot)
    low, high = _percentile(boot, level)
    pairs = np.concatenate(diffs)
    return _comparison(mean, low, high, pairs, level, tol,
                       f"paired differences, {_hierarchical_method(diffs, level, n_boot)}; sign test over "
                       f"{pairs.size} prompt-seed pairs")


def seed_level_difference(method_per_seed: Sequence[float], baseline_per_seed: Sequence[float],
                          level: float = 0.95, n_boot: int = 10000, seed: int = 0,
                          tol: float = TIE_TOL) -> Comparison:
    """Method against baseline paired over seeds only, for metrics with one value per run (KL, wall time).

    `mean_diff` is the mean over seeds of method - baseline, with its percentile bootstrap interval
    over seeds; the sign test runs over seeds. With 5 seeds or fewer the sign test cannot go below
    0.0625, so nothing is significant at 95%: five seeds are too few to claim a difference this way.
    """
    m, b = _as_values(method_per_seed, "seeds"), _as_values(baseline_per_seed, "seeds")
    if m.size != b.size:
        raise ValueError(f"method has {m.size} seeds, baseline {b.size}")
    d = m - b
    ci = bootstrap_ci(d, level, n_boot, seed, unit="seeds")
    return _comparison(ci.mean, ci.low, ci.high, d, level, tol,
                       f"paired differences, {ci.method}; sign test over {d.size} seeds")


def best_of_n_estimate(scores: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected `values` of best-of-n, estimated from N >= n samples of one prompt.

    Best-of-n draws n responses and keeps the one with the highest score. From N i.i.d. samples
    this averages that choice over every n-subset of them, each subset being itself a draw of n:
    the unbiased estimator of Nakano et al. 2021 (WebGPT, appendix) that Gao et al. 2022 use for
    their best-of-n curves. As a U-statistic it has the least variance of the unbiased estimators,
    well below taking the first n samples, and one draw of N gives every n <= N.

    With the samples sorted by score, the k-th lowest (1-based) is the best of a uniform n-subset
    with probability C(k-1, n-1) / C(N, n). Equal scores are broken uniformly at random: a group of
    tied samples shares its summed probability equally, so it contributes its mean value.
    ValueError when the lengths differ, N < n, n < 1, or a number is not finite.
    """
    s, v = _as_values(scores, "samples"), _as_values(values, "samples")
    if s.size != v.size:
        raise ValueError(f"{s.size} scores for {v.size} values")
    if not 1 <= n <= s.size:
        raise ValueError(f"best-of-{n} needs 1 <= n <= the {s.size} samples")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    total = math.comb(s.size, n)
    weights = np.array([math.comb(k - 1, n - 1) / total for k in range(1, s.size + 1)])  # (N,), sums to 1
    out, start = 0.0, 0
    while start < s.size:  # one group of equal scores at a time
        end = start + 1
        while end < s.size and s[end] == s[start]:
            end += 1
        out += float(weights[start:end].sum() * v[start:end].mean())
        start = end
    return out


def exact_sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test: P(a count this far from n/2) with n = wins + losses, p = 1/2.

    Twice the smaller tail, capped at 1; 1.0 when n == 0. Computed with exact integers.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0 (got {wins}, {losses})")
    n = wins + losses
    tail, term = 0, 1  # sum of C(n, i) for i <= min(wins, losses); term = C(n, i)
    for i in range(min(wins, losses) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom.

    Inverts the t CDF, F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0, by bisection on the
    regularized incomplete beta I, which `_betainc` computes by its continued fraction.
    """
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    tail = 1 - p  # find x with I_x(df/2, 1/2) / 2 == tail; I rises with x, t falls with it
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _betainc(df / 2, 0.5, mid) / 2 < tail:
            lo = mid
        else:
            hi = mid
    x = (lo + hi) / 2
    return math.sqrt(df * (1 - x) / x)


def parse_seeds(text: str) -> list[int]:
    """Seeds from text: '0-4' -> [0, 1, 2, 3, 4], '0,2,5' -> [0, 2, 5], '0-2,7' -> [0, 1, 2, 7].

    Ranges are inclusive, order is kept, spaces around items are ignored. Raises ValueError with a
    one-line message for anything else: a reversed range, a negative or non-integer seed, a seed
    given twice, a seed above 2**32 - 1.
    """
    if not str(text).strip():
        raise ValueError("seeds: none given (write e.g. '0-4', '0,2,5' or '0-2,7')")
    seeds: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            first, last = int(item), int(item)
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", item):
            first, last = int(m[1]), int(m[2])
            if first > last:
                raise ValueError(f"seeds '{text}': range '{item}' is reversed; write '{last}-{first}'")
        elif re.fullmatch(r"-\s*\d+", item):
            raise ValueError(f"seeds '{text}': '{item}' is negative; seeds are >= 0")
        else:
            raise ValueError(f"seeds '{text}': '{item}' is not a seed or a range a-b "
                             f"(write e.g. '0-4', '0,2,5' or '0-2,7')")
        if last > MAX_SEED:
            raise ValueError(f"seeds '{text}': {last} is above the largest seed, 2**32-1 = {MAX_SEED}")
        seeds += range(first, last + 1)
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ValueError(f"seeds '{text}': seed {s} is given twice")
        seen.add(s)
    return seeds


def _comparison(mean: float, low: float, high: float, diffs: np.ndarray, level: float, tol: float,
                method: str) -> Comparison:
    """Counts, sign test and the significance rule, shared by both paired comparisons."""
    wins, losses = int(np.sum(diffs > tol)), int(np.sum(diffs < -tol))
    p = exact_sign_test(wins, losses)
    alpha = 1 - level
    significant = (low > 0 or high < 0) and p < alpha
    return Comparison(mean, low, high, wins, losses, diffs.size - wins - losses, p, significant,
                      f"{method}; significant = interval excludes 0 and sign test p < {alpha:.2g}")


def _resample_means(rng: np.random.Generator, x: np.ndarray, k: int) -> np.ndarray:
    """Means of `k` resamples of `x` with replacement, each of x.size draws. Shape (k,)."""
    out = np.empty(k)
    rows = max(1, _MAX_DRAWS // x.size)
    for start in range(0, k, rows):
        idx = rng.integers(0, x.size, size=(min(rows, k - start), x.size))  # (rows, n)
        out[start:start + idx.shape[0]] = x[idx].mean(axis=1)
    return out


def _hierarchical_means(rng: np.random.Generator, groups: list[np.ndarray], n_boot: int) -> np.ndarray:
    """`n_boot` resampled means over seeds of prompt means: seeds drawn, then each one's prompts. Shape (n_boot,)."""
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))  # (B, S): the seed filling each slot
    slot_means = np.empty(picks.shape)  # (B, S): that slot's resampled prompt mean
    for s, g in enumerate(groups):
        drawn = picks == s
        slot_means[drawn] = _resample_means(rng, g, int(drawn.sum()))
    return slot_means.mean(axis=1)


def _hierarchical_method(groups: list[np.ndarray], level: float, n_boot: int) -> str:
    """The `method` text of a hierarchical interval, naming the seeds and the prompts per seed."""
    sizes = sorted({g.size for g in groups})
    prompts = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    if len(groups) == 1:
        return f"percentile bootstrap over {prompts} prompts of a single seed (no seed spread), {level:.0%}, " \
               f"{n_boot} resamples"
    return (f"hierarchical percentile bootstrap over {len(groups)} seeds, then {prompts} prompts within each, "
            f"{level:.0%}, {n_boot} resamples")


def _percentile(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means, linearly interpolated."""
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _as_values(values: Sequence[float], unit: str) -> np.ndarray:
    """`values` as a flat float array, one per unit; ValueError when empty, nested or not finite."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"expected one value per {unit[:-1]} (a flat sequence), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"no {unit}: an interval needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values over {unit} must be finite (got {x[~np.isfinite(x)][0]})")
    return x


def _as_groups(per_seed_per_prompt: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """One flat array of prompt scores per seed; the ValueError names the seed at fault."""
    if len(per_seed_per_prompt) == 0:
        raise ValueError("no seeds: an interval needs at least one")
    groups = []
    for s, per_prompt in enumerate(per_seed_per_prompt):
        try:
            groups.append(_as_values(per_prompt, "prompts"))
        except ValueError as e:
            raise ValueError(f"seed {s}: {e}") from None
    return groups


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (got {level})")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1 (got {n_boot})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (Numerical Recipes, 3rd ed., 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast here; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method; O(sqrt(max(a, b))) terms."""
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h
