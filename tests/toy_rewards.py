"""Reward functions for the PPO tests, imported by `module:function` like a user's own."""


def fraction_of_sevens(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are '7': dense enough to learn in a few steps."""
    return [r.count("7") / max(1, len(r)) for r in responses]


def raises(prompts: list[str], responses: list[str]) -> list[float]:
    raise RuntimeError("boom")


def wrong_count(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) + 1)


def nan_scores(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def char_sum(prompts: list[str], responses: list[str]) -> list[float]:
    """Sum of the response's character codes: almost never ties, so the best of n is one known response."""
    return [float(sum(map(ord, r))) for r in responses]


def char_sum_mod(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense reward that differs between almost any two responses (groups rarely tie)."""
    return [(sum(map(ord, r)) % 97) / 97 for r in responses]


def constant_below_four(prompts: list[str], responses: list[str]) -> list[float]:
    """Constant for prompts `a+b=` with a < 4, `char_sum_mod` otherwise (dynamic-sampling test)."""
    varied = char_sum_mod(prompts, responses)
    return [0.5 if int(p[0]) < 4 else v for p, v in zip(prompts, varied)]
