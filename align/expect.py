"""Recipes that check themselves: the `expect:` block and its PASS/FAIL lines.

A recipe may hold a list of expectations, each a bound on one metric over the seeds of a run:

    expect:
      - {metric: greedy/gold_reward, model: sft+ppo, minus: sft, min: 0.25, at: every_seed}
      - {metric: greedy/gold_reward, model: sft+ppo, min: 0.8, at: mean}
      - {metric: rm/val/accuracy, min: 0.90}
      - {metric: kl, model: sft+ppo, max: 3.0}

    metric  required  the metric's name
    model   optional  the display name of an evaluated model; absent for a run-level metric
    minus   optional  another model: the bound is on model's metric minus this model's, seed by seed
    min     \\ at least one; both bounds are inclusive (a value equal to min passes)
    max     /
    at      every_seed (default)  every seed's value must lie within the bounds
            mean                  the mean over seeds must
            ci_low                the low end of the 95% percentile bootstrap interval of the mean over
                                  seeds must be >= min (max is not allowed here); it needs at least 2
                                  seeds, and its 10000 resamples are seeded, so a verdict is repeatable
    name    optional  a label for the PASS/FAIL line

`check` reads the measured values as `values[seed][key]`, the key being `value_key(metric, model)`:
`"<model>:<metric>"` for a model's metric (`"sft+ppo:greedy/gold_reward"`) and the bare metric for
a run-level one (`"rm/val/accuracy"`). A value missing or not finite at any seed fails the
expectation and says at which seed; nothing passes for want of data.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from align.errors import ConfigError
from align.stats import bootstrap_ci

AT: dict[str, str] = {  # mode: how it reads in a PASS/FAIL line
    "every_seed": "at every seed",
    "mean": "on the mean over seeds",
    "ci_low": "at the low end of the 95% bootstrap interval over seeds",
}
KEYS = ("metric", "model", "minus", "min", "max", "at", "name")


@dataclass(frozen=True)
class Expectation:
    """One bound on one metric (or a difference of two models' metric) over the seeds of a run.

    Made by `parse_expectations`, which checks the fields against each other.
    """

    metric: str
    model: str | None = None
    """The evaluated model's display name; None for a run-level metric."""
    minus: str | None = None
    """A second model: the bound is on model's metric minus this one's, taken seed by seed."""
    min: float | None = None
    max: float | None = None
    """Inclusive bounds; at least one is set."""
    at: Literal["every_seed", "mean", "ci_low"] = "every_seed"
    """One of AT: every seed's value, the mean over seeds, or the low end of its 95% bootstrap interval."""
    name: str | None = None

    def describe(self) -> str:
        """E.g. 'greedy/gold_reward(sft+ppo) - greedy/gold_reward(sft) >= 0.25 at every seed'."""
        def term(model: str | None) -> str:
            return f"{self.metric}({model})" if model else self.metric

        lhs = term(self.model) + (f" - {term(self.minus)}" if self.minus else "")
        if self.min is not None and self.max is not None:
            bound = f"in [{self.min:g}, {self.max:g}]"
        else:
            bound = f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"
        return f"{self.name + ': ' if self.name else ''}{lhs} {bound} {AT[self.at]}"


@dataclass(frozen=True)
class Measured:
    """What an expectation was held against."""

    per_seed: dict[int, float]
    """Seed -> the value checked (the difference, with minus), for every seed where it was measured."""
    aggregate: dict[str, float]
    """The statistics over seeds the bounds met: 'min' and/or 'max' (every_seed), 'mean' (mean), or
    'ci_low' with the interval's 'mean' and 'ci_high' beside it (ci_low). Empty when a value was missing."""


@dataclass(frozen=True)
class Outcome:
    """The verdict on one expectation."""

    expectation: Expectation
    passed: bool
    measured: Measured
    text: str
    """One line: 'PASS  <expectation>: <what was measured>' or 'FAIL  ...', with the reason on a missing value."""


def value_key(metric: str, model: str | None = None) -> str:
    """The key of a metric in `check`'s values: '<model>:<metric>', or the bare metric for a run-level one."""
    return f"{model}:{metric}" if model else metric


def parse_expectations(raw: Any, where: str) -> list[Expectation]:
    """The recipe's `expect:` block as Expectations; None (no block) gives [].

    Raises ConfigError with one line, `<where>: expect[i].<key> ...`, for an unknown key (with the
    nearest valid one), a missing metric, neither min nor max, min > max, a bad `at`, a wrong type.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expect must be a list of mappings like {{metric: ..., min: ...}} "
                          f"(got {type(raw).__name__})")
    return [_parse_one(item, f"{where}: expect[{i}]") for i, item in enumerate(raw)]


def check(expectations: Sequence[Expectation], values: Mapping[int, Mapping[str, float]]) -> list[Outcome]:
    """Hold each expectation against `values[seed][value_key(metric, model)]`, seeds in ascending order."""
    return [_check_one(e, values) for e in expectations]


def format_outcomes(outcomes: Sequence[Outcome]) -> str:
    """The PASS/FAIL lines, then a count of those that passed."""
    passed = sum(o.passed for o in outcomes)
    return "\n".join([o.text for o in outcomes] + [f"{passed} of {len(outcomes)} expectations passed"])


def all_passed(outcomes: Sequence[Outcome]) -> bool:
    """True when every expectation passed (and so when there are none)."""
    return all(o.passed for o in outcomes)


def _parse_one(item: Any, where: str) -> Expectation:
    """One entry of the block; `where` is '<file>: expect[i]'."""
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping like {{metric: ..., min: ...}} (got {item!r})")
    for key in item:
        if key not in KEYS:
            near = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(KEYS)}"
            raise ConfigError(f"{where}.{key}: unknown key; {hint}")
    if "metric" not in item:
        raise ConfigError(f"{where}.metric: missing; name the metric to check, e.g. greedy/gold_reward")
    text = {k: _string(item, k, where) for k in ("metric", "model", "minus", "name")}
    bounds = {k: _number(item, k, where) for k in ("min", "max")}
    mode = item.get("at", "every_seed")
    if not isinstance(mode, str) or mode not in AT:
        raise ConfigError(f"{where}.at must be one of {', '.join(AT)} (got {mode!r})")
    low, high = bounds["min"], bounds["max"]
    if low is None and high is None:
        raise ConfigError(f"{where}.min: missing; set min, max or both")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}.min: {low:g} is above max {high:g}")
    if mode == "ci_low" and high is not None:
        raise ConfigError(f"{where}.max: at ci_low checks only min, against the interval's low end; "
                          f"bound max at mean or every_seed")
    if text["minus"] is not None and text["model"] is None:
        raise ConfigError(f"{where}.minus: needs model (the model whose metric the other's is subtracted from)")
    if text["minus"] is not None and text["minus"] == text["model"]:
        raise ConfigError(f"{where}.minus: is model itself ({text['model']!r}); the difference is always 0")
    return Expectation(text["metric"], text["model"], text["minus"], low, high, mode, text["name"])


def _string(item: dict[str, Any], key: str, where: str) -> str | None:
    if key not in item:
        return None
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}.{key} must be a non-empty string (got {value!r})")
    return value


def _number(item: dict[str, Any], key: str, where: str) -> float | None:
    if key not in item:
        return None
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} must be a finite number (got {value!r})")
    return float(value)


def _check_one(e: Expectation, values: Mapping[int, Mapping[str, float]]) -> Outcome:
    if not values:
        return _outcome(e, False, {}, {}, "no seeds measured")
    keys = [value_key(e.metric, e.model)] + ([value_key(e.metric, e.minus)] if e.minus else [])
    per_seed: dict[int, float] = {}
    problems: dict[str, list[str]] = {}  # 'sft:kl missing at seed' -> ['3', '4']
    for seed in sorted(values):
        row = values[seed]
        for key in keys:
            if key not in row:
                problems.setdefault(f"{key} missing at seed", []).append(str(seed))
            elif not math.isfinite(row[key]):
                problems.setdefault(f"{key} not finite at seed", []).append(f"{seed} ({row[key]})")
        if all(k in row and math.isfinite(row[k]) for k in keys):
            per_seed[seed] = row[keys[0]] - row[keys[1]] if e.minus else row[keys[0]]
    if problems:
        return _outcome(e, False, per_seed, {}, "; ".join(f"{what} {', '.join(seeds)}"
                                                         for what, seeds in problems.items()))
    measured = list(per_seed.values())
    if e.at == "every_seed":
        lowest, highest = min(per_seed, key=per_seed.__getitem__), max(per_seed, key=per_seed.__getitem__)
        extremes = {"min": lowest, "max": highest}  # stat -> the seed where it is reached
        shown = [stat for stat, bound in (("min", e.min), ("max", e.max)) if bound is not None]
        aggregate = {stat: per_seed[extremes[stat]] for stat in shown}
        detail = ", ".join(f"{stat} {aggregate[stat]:.6g} (seed {extremes[stat]})" for stat in shown)
        passed = _within(e, per_seed[lowest], per_seed[highest])
    elif e.at == "mean":
        mean = sum(measured) / len(measured)
        aggregate = {"mean": mean}
        detail = f"mean {mean:.6g}"
        passed = _within(e, mean, mean)
    else:  # ci_low; parse_expectations allows min only here
        if len(measured) < 2:
            return _outcome(e, False, per_seed, {}, f"ci_low needs at least 2 seeds (got {len(measured)})")
        ci = bootstrap_ci(measured, level=0.95)
        aggregate = {"ci_low": ci.low, "mean": ci.mean, "ci_high": ci.high}
        detail = f"95% interval [{ci.low:.6g}, {ci.high:.6g}], mean {ci.mean:.6g},"
        passed = _within(e, ci.low, ci.low)
    listed = ", ".join(f"{v:.4g}" for v in measured)
    return _outcome(e, passed, per_seed, aggregate, f"{detail} over {len(measured)} seeds [{listed}]")


def _within(e: Expectation, lowest: float, highest: float) -> bool:
    """Whether the smallest checked value meets min and the largest meets max, both inclusive."""
    return (e.min is None or lowest >= e.min) and (e.max is None or highest <= e.max)


def _outcome(e: Expectation, passed: bool, per_seed: dict[int, float], aggregate: dict[str, float],
             detail: str) -> Outcome:
    text = f"{'PASS' if passed else 'FAIL'}  {e.describe()}: {detail}"
    return Outcome(e, passed, Measured(per_seed, aggregate), text)
