"""align.expect: parsing the `expect:` block and holding it against per-seed values; no model is loaded."""

from __future__ import annotations

from typing import Any

import pytest

from align.errors import ConfigError
from align.expect import Expectation, all_passed, check, format_outcomes, parse_expectations, value_key

WHERE = "recipes/r.yaml"
VALUES = {  # values[seed][key]; differences sft+ppo - sft: 0.25, 0.5, 0.375 (exact in binary)
    0: {"sft+ppo:greedy/gold_reward": 0.75, "sft:greedy/gold_reward": 0.5, "rm/val/accuracy": 0.9,
        "sft+ppo:kl": 2.0},
    1: {"sft+ppo:greedy/gold_reward": 0.875, "sft:greedy/gold_reward": 0.375, "rm/val/accuracy": 0.95,
        "sft+ppo:kl": 3.0},
    2: {"sft+ppo:greedy/gold_reward": 0.875, "sft:greedy/gold_reward": 0.5, "rm/val/accuracy": 0.92,
        "sft+ppo:kl": 1.0},
}


def one(raw: dict[str, Any], values: dict[int, dict[str, float]] = VALUES) -> tuple[bool, str]:
    [outcome] = check(parse_expectations([raw], WHERE), values)
    return outcome.passed, outcome.text


def test_parse_the_documented_block() -> None:
    raw = [{"metric": "greedy/gold_reward", "model": "sft+ppo", "minus": "sft", "min": 0.25, "at": "every_seed"},
           {"metric": "greedy/gold_reward", "model": "sft+ppo", "min": 0.8, "at": "mean"},
           {"metric": "rm/val/accuracy", "min": 0.90, "at": "every_seed"},
           {"metric": "kl", "model": "sft+ppo", "max": 3, "name": "kl budget"}]
    got = parse_expectations(raw, WHERE)
    assert got == [Expectation("greedy/gold_reward", "sft+ppo", "sft", 0.25, None, "every_seed"),
                   Expectation("greedy/gold_reward", "sft+ppo", None, 0.8, None, "mean"),
                   Expectation("rm/val/accuracy", None, None, 0.9, None, "every_seed"),
                   Expectation("kl", "sft+ppo", None, None, 3.0, "every_seed", "kl budget")]
    assert isinstance(got[3].max, float)
    assert parse_expectations(None, WHERE) == [] and parse_expectations([], WHERE) == []


@pytest.mark.parametrize(("raw", "message"), [
    ({"metric": "kl", "mni": 0.1}, "recipes/r.yaml: expect[0].mni: unknown key; did you mean 'min'?"),
    ({"metric": "kl", "min": 0.1, "modle": "sft"}, "expect[0].modle: unknown key; did you mean 'model'?"),
    ({"metric": "kl", "min": 0.1, "zzz": 1}, "expect[0].zzz: unknown key; valid keys: metric, model, minus"),
    ({"model": "sft", "min": 0.1}, "expect[0].metric: missing"),
    ({"metric": "kl"}, "expect[0].min: missing; set min, max or both"),
    ({"metric": "kl", "min": 2, "max": 1}, "expect[0].min: 2 is above max 1"),
    ({"metric": "kl", "min": 1, "at": "median"}, "expect[0].at must be one of every_seed, mean, ci_low (got 'median')"),
    ({"metric": "kl", "min": 1, "at": ["mean"]}, "expect[0].at must be one of every_seed, mean, ci_low (got ['mean'])"),
    ({"metric": "kl", "min": "0.5"}, "expect[0].min must be a finite number (got '0.5')"),
    ({"metric": "kl", "max": True}, "expect[0].max must be a finite number (got True)"),
    ({"metric": "kl", "max": float("nan")}, "expect[0].max must be a finite number (got nan)"),
    ({"metric": 3, "min": 1}, "expect[0].metric must be a non-empty string (got 3)"),
    ({"metric": "kl", "model": "", "min": 1}, "expect[0].model must be a non-empty string (got '')"),
    ({"metric": "kl", "model": ["a"], "min": 1}, "expect[0].model must be a non-empty string (got ['a'])"),
    ({"metric": "kl", "minus": "sft", "min": 1}, "expect[0].minus: needs model"),
    ({"metric": "kl", "model": "sft", "minus": "sft", "min": 1}, "expect[0].minus: is model itself ('sft')"),
    ({"metric": "kl", "min": 1, "max": 2, "at": "ci_low"}, "expect[0].max: at ci_low checks only min"),
    ("kl >= 1", "expect[0] must be a mapping"),
])
def test_parse_errors_are_one_line_naming_the_key(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_expectations([{"metric": "ok", "min": 0}, raw], WHERE)
    text = str(err.value)
    assert message.replace("expect[0]", "expect[1]") in text
    assert text.startswith(f"{WHERE}: expect[1]") and "\n" not in text


def test_expect_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"^recipes/r.yaml: expect must be a list of mappings .*\(got dict\)$"):
        parse_expectations({"metric": "kl", "min": 1}, WHERE)


def test_value_key_convention() -> None:
    assert value_key("greedy/gold_reward", "sft+ppo") == "sft+ppo:greedy/gold_reward"
    assert value_key("rm/val/accuracy") == "rm/val/accuracy"


@pytest.mark.parametrize(("raw", "passed"), [
    # every_seed: the smallest value must meet min, the largest max; equality passes.
    ({"metric": "rm/val/accuracy", "min": 0.9}, True),
    ({"metric": "rm/val/accuracy", "min": 0.91}, False),
    ({"metric": "kl", "model": "sft+ppo", "max": 3.0}, True),
    ({"metric": "kl", "model": "sft+ppo", "max": 2.99}, False),
    ({"metric": "kl", "model": "sft+ppo", "min": 1.0, "max": 3.0}, True),
    ({"metric": "kl", "model": "sft+ppo", "min": 1.5, "max": 3.0}, False),
    # mean over seeds of kl: 2.0 exactly.
    ({"metric": "kl", "model": "sft+ppo", "min": 2.0, "at": "mean"}, True),
    ({"metric": "kl", "model": "sft+ppo", "max": 2.0, "at": "mean"}, True),
    ({"metric": "kl", "model": "sft+ppo", "min": 2.01, "at": "mean"}, False),
    ({"metric": "kl", "model": "sft+ppo", "max": 1.99, "at": "mean"}, False),
    # every seed's kl <= 3 but the mean is 2: a mean bound of 1.5 fails although 1.0 is among the seeds.
    ({"metric": "kl", "model": "sft+ppo", "max": 1.5, "at": "mean"}, False),
    # ci_low over the seeds' kl [2, 3, 1]: the 2.5% quantile of the resampled means is 1 (all three draws seed 2's
    # 1.0 has probability 1/27 > 2.5%), so min 1 passes at the boundary and anything above fails.
    ({"metric": "kl", "model": "sft+ppo", "min": 1.0, "at": "ci_low"}, True),
    ({"metric": "kl", "model": "sft+ppo", "min": 1.01, "at": "ci_low"}, False),
    ({"metric": "kl", "model": "sft+ppo", "min": 1.5, "at": "mean"}, True),  # the mean passes where ci_low does not
    ({"metric": "kl", "model": "sft+ppo", "min": 1.5, "at": "ci_low"}, False),
])
def test_every_mode_passes_and_fails(raw: dict[str, Any], passed: bool) -> None:
    got, text = one(raw)
    assert got is passed, text
    assert text.startswith("PASS  " if passed else "FAIL  ")


def test_ci_low_is_a_bootstrap_low_end() -> None:
    values = {s: {"acc": v} for s, v in enumerate([0.90, 0.92, 0.94, 0.96, 0.98])}
    [outcome] = check(parse_expectations([{"metric": "acc", "min": 0.9, "at": "ci_low"}], WHERE), values)
    low = outcome.measured.aggregate["ci_low"]
    assert outcome.measured.aggregate["mean"] == pytest.approx(0.94)
    assert 0.9 < low < 0.94 < outcome.measured.aggregate["ci_high"] < 0.98
    assert outcome.passed and "95% interval [" in outcome.text


def test_ci_low_needs_two_seeds() -> None:
    passed, text = one({"metric": "rm/val/accuracy", "min": 0.5, "at": "ci_low"}, {0: {"rm/val/accuracy": 0.99}})
    assert not passed and "ci_low needs at least 2 seeds (got 1)" in text


def test_difference_mode() -> None:
    # Differences 0.25, 0.5, 0.375: min 0.25 passes exactly at seed 0; mean 0.375.
    passed, text = one({"metric": "greedy/gold_reward", "model": "sft+ppo", "minus": "sft", "min": 0.25})
    assert passed
    assert text == ("PASS  greedy/gold_reward(sft+ppo) - greedy/gold_reward(sft) >= 0.25 at every seed: "
                    "min 0.25 (seed 0) over 3 seeds [0.25, 0.5, 0.375]")
    assert not one({"metric": "greedy/gold_reward", "model": "sft+ppo", "minus": "sft", "min": 0.26})[0]
    passed, text = one({"metric": "greedy/gold_reward", "model": "sft+ppo", "minus": "sft", "max": 0.375,
                        "at": "mean"})
    assert passed and "mean 0.375 over 3 seeds" in text
    # Without minus the same bound is on the model's own value, 0.75 at the lowest.
    assert one({"metric": "greedy/gold_reward", "model": "sft+ppo", "min": 0.75})[0]


def test_measured_holds_per_seed_values_and_the_aggregate() -> None:
    [outcome] = check(parse_expectations([{"metric": "kl", "model": "sft+ppo", "min": 0.5, "max": 3}], WHERE), VALUES)
    assert outcome.measured.per_seed == {0: 2.0, 1: 3.0, 2: 1.0}
    assert outcome.measured.aggregate == {"min": 1.0, "max": 3.0}
    assert "min 1 (seed 2), max 3 (seed 1) over 3 seeds [2, 3, 1]" in outcome.text


@pytest.mark.parametrize("at", ["every_seed", "mean", "ci_low"])
def test_missing_metric_fails_naming_the_seed(at: str) -> None:
    values = {s: dict(row) for s, row in VALUES.items()}
    del values[1]["sft:greedy/gold_reward"]
    del values[2]["sft:greedy/gold_reward"]
    passed, text = one({"metric": "greedy/gold_reward", "model": "sft+ppo", "minus": "sft", "min": -100, "at": at},
                       values)
    assert not passed
    assert text.startswith("FAIL  ") and text.endswith("sft:greedy/gold_reward missing at seed 1, 2")
    passed, text = one({"metric": "greedy/gold_reward", "model": "ppo", "min": -100, "at": at})
    assert not passed and "ppo:greedy/gold_reward missing at seed 0, 1, 2" in text
    passed, text = one({"metric": "rm/val/accuracy", "min": 0, "at": at}, {})
    assert not passed and "no seeds measured" in text


def test_non_finite_value_fails() -> None:
    values = {0: {"kl": 1.0}, 1: {"kl": float("nan")}}
    passed, text = one({"metric": "kl", "max": 100.0}, values)
    assert not passed and "kl not finite at seed 1 (nan)" in text


def test_format_outcomes_and_all_passed() -> None:
    expectations = parse_expectations([{"metric": "rm/val/accuracy", "min": 0.9, "name": "rm accurate"},
                                       {"metric": "kl", "model": "sft+ppo", "max": 2.5}], WHERE)
    outcomes = check(expectations, VALUES)
    report = format_outcomes(outcomes)
    assert report.splitlines() == [
        "PASS  rm accurate: rm/val/accuracy >= 0.9 at every seed: min 0.9 (seed 0) over 3 seeds [0.9, 0.95, 0.92]",
        "FAIL  kl(sft+ppo) <= 2.5 at every seed: max 3 (seed 1) over 3 seeds [2, 3, 1]",
        "1 of 2 expectations passed",
    ]
    assert not all_passed(outcomes)
    assert all_passed(outcomes[:1])
    assert all_passed([])
