"""Two-operand addition with a demonstrator that often forgets the carry.

This is the default offline recipe's task. It is built so that the pipeline's story can be read
off numbers: SFT imitates a flawed demonstrator and so tops out near its accuracy; preference
pairs rank the correct sum above the flawed one; a gold reward (exact correctness) is known here
but is used by evaluation only, never shown to training, so PPO has to get past the demonstrator
through the learned reward model.

The demonstrator answers a problem correctly with probability `1 - p_forget`; otherwise it adds
column by column and drops every carry (`forget_carry`). On a problem with no carry both answers
coincide, so its expected gold accuracy is `1 - p_forget * P(carry)`.

`build` writes every split as JSONL from one seed, byte-identically for the same arguments, with
the eval problems disjoint from every training split.

Two formats make the algorithm learnable by a tiny model in CPU minutes (Lee et al. 2023,
"Teaching Arithmetic to Small Transformers"): `pad=True` writes operands with `n_digits` digits
and answers with `n_digits + 1` (07+68=075), so every digit sits at a fixed position; and
`reverse=True` writes answers least-significant digit first (57+68= -> "521"), so each output
digit depends only on its column and the carry just written. `gold_reward_reversed` scores
reversed answers; `gold_reward` compares numbers, so zero padding never changes a score.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# `a+b=` anywhere in the prompt, so a template wrapped around the bare problem still parses.
_PROBLEM_RE = re.compile(r"(\d+)\+(\d+)=")

Pair = tuple[int, int]


def _columns(a: int, b: int) -> Iterator[tuple[int, int]]:
    """The digit pairs of `a` and `b`, least significant column first."""
    if a < 0 or b < 0:
        # Floor division of a negative number never reaches 0: refuse rather than loop forever.
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    while a or b:
        yield a % 10, b % 10
        a, b = a // 10, b // 10


def has_carry(a: int, b: int) -> bool:
    """True if adding `a` and `b` carries in any column.

    A carry happens iff some column's digits sum to 10 or more: an incoming carry can only
    push a column over 9 if an earlier column already carried.
    """
    return any(x + y >= 10 for x, y in _columns(a, b))


def correct(a: int, b: int) -> str:
    """The correct answer to `a+b=`."""
    return str(a + b)


def forget_carry(a: int, b: int) -> str:
    """The flawed demonstrator's answer: each column's digit sum mod 10, every carry dropped,
    including the overflow of the top column (57+68 -> "15"); no leading zeros ("0" if all zero).
    """
    # Building an int (rather than a digit string) strips leading zeros for free.
    total = sum(((x + y) % 10) * 10**i for i, (x, y) in enumerate(_columns(a, b)))
    return str(total)


def _written(answer: str, reverse: bool, width: int = 0) -> str:
    """An answer as the task writes it: zero-padded to `width`, then as is or least-significant
    digit first."""
    answer = answer.zfill(width)
    return answer[::-1] if reverse else answer


def near_miss(answer: str, rng: np.random.Generator) -> str:
    """`answer` with one digit replaced by a different digit: a wrong answer that looks right.

    Preference pairs made only of (correct, forget-carry) teach a reward model to spot that one
    flaw; PPO then finds other wrong answers the model never saw and scores high (reward
    over-optimisation, Gao et al. 2022). Near misses teach it that every digit matters.
    """
    i = int(rng.integers(0, len(answer)))
    digit = int(answer[i])
    new = (digit + int(rng.integers(1, 10))) % 10
    return answer[:i] + str(new) + answer[i + 1:]


def prompt(a: int, b: int, width: int = 0) -> str:
    """The prompt text of a problem, operands zero-padded to `width` digits."""
    return f"{a:0{width}d}+{b:0{width}d}=" if width else f"{a}+{b}="


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response (whitespace-stripped) is exactly the correct sum, else 0.0.

    The operands are parsed from the last `a+b=` in each prompt, so a template around the
    problem (or few-shot examples before it) still parses. For evaluation only: training never
    sees this function.
    """
    return _gold(prompts, responses, reverse=False)


def gold_reward_reversed(prompts: list[str], responses: list[str]) -> list[float]:
    """`gold_reward` for answers written least-significant digit first (`build(reverse=True)`)."""
    return _gold(prompts, responses, reverse=True)


def _gold(prompts: list[str], responses: list[str], reverse: bool) -> list[float]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rewards = []
    for i, (text, response) in enumerate(zip(prompts, responses)):
        matches = _PROBLEM_RE.findall(text)
        if not matches:
            raise ValueError(f"prompt {i} has no 'a+b=' problem: {text!r}")
        a, b = (int(x) for x in matches[-1])
        answer = response.strip()
        if reverse:
            answer = answer[::-1]
        rewards.append(1.0 if answer.isdigit() and int(answer) == a + b else 0.0)
    return rewards


def _mean_gold(rows: list[dict[str, str]], reverse: bool) -> float | None:
    gold = _gold([r["prompt"] for r in rows], [r["response"] for r in rows], reverse)
    return sum(gold) / len(gold) if gold else None


def _draw_pairs(
    rng: np.random.Generator,
    n: int,
    n_digits: int,
    allowed: Callable[[Pair], bool],
    unique: bool = False,
) -> list[Pair]:
    """`n` problems with operands uniform in [0, 10**n_digits), keeping only `allowed` ones
    (rejection sampling), each at most once if `unique`. The caller guarantees enough allowed
    pairs exist, else this would not terminate."""
    high = 10**n_digits
    chosen: list[Pair] = []
    seen: set[Pair] = set()
    while len(chosen) < n:
        a = rng.integers(0, high, size=n).tolist()
        b = rng.integers(0, high, size=n).tolist()
        for pair in zip(a, b):
            if len(chosen) == n:
                break
            if not allowed(pair) or (unique and pair in seen):
                continue
            seen.add(pair)
            chosen.append(pair)
    return chosen


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and `os.replace`, so an
    interrupted run leaves either the old file or no file, never a truncated one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Encoded bytes with "\n" line ends: identical on every platform for the same seed.
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build(
    out_dir: Path,
    seed: int,
    n_digits: int = 2,
    n_sft: int = 4000,
    n_pref: int = 4000,
    n_prompts: int = 2000,
    n_eval: int = 200,
    p_forget: float = 0.6,
    reverse: bool = False,
    pad: bool = False,
    p_near_miss: float = 0.0,
    teacher_p_forget: float | None = None,
) -> dict[str, Path]:
    """Generate every split of the task into `out_dir` and return their paths.

    Keys and row formats:
      sft_train, sft_val  {"prompt", "response"}  flawed-demonstrator responses
      pref_train, pref_val {"prompt", "chosen", "rejected"}  chosen = correct sum; rejected =
                          the forget-carry answer (carry problems), or for a share
                          `p_near_miss` of pairs (any problem) a one-digit near miss
      prompts             {"prompt"}  PPO training prompts
      eval                {"prompt", "answer"}  held-out, distinct problems, correct answers
      sft_teacher         {"prompt", "response"}  only with `teacher_p_forget`: sft_train's
                          problems, in its order, answered by a better demonstrator that forgets
                          the carry with probability `teacher_p_forget` (0: the gold solver), the
                          "distilled from a better teacher" data of recipes/addition_data.yaml
    Validation splits hold 10% extra examples (at least one), drawn separately.

    Eval problems are drawn first and excluded from every other split. Each split has its own
    random stream spawned from `seed`, so changing one split's size does not reshuffle the
    others. `task.json` (parameters, counts, the demonstrator's measured gold accuracy on
    sft_train, the fraction of eval problems with a carry) is written last, so its presence
    marks a complete build.
    """
    if n_digits < 1 or 10**n_digits > 2**62:
        raise ValueError(f"n_digits must be in [1, 18], got {n_digits}")
    if not 0.0 <= p_forget <= 1.0:
        raise ValueError(f"p_forget must be in [0, 1], got {p_forget}")
    if not 0.0 <= p_near_miss <= 1.0:
        raise ValueError(f"p_near_miss must be in [0, 1], got {p_near_miss}")
    if teacher_p_forget is not None and not (isinstance(teacher_p_forget, (int, float))
                                             and 0.0 <= teacher_p_forget <= 1.0):
        raise ValueError(f"teacher_p_forget must be in [0, 1], got {teacher_p_forget!r}")
    sizes = {"n_sft": n_sft, "n_pref": n_pref, "n_prompts": n_prompts, "n_eval": n_eval}
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    n_pairs = 100**n_digits
    if n_eval > n_pairs:
        raise ValueError(
            f"n_eval={n_eval} exceeds the {n_pairs} distinct {n_digits}-digit problems"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The teacher's stream is the 7th child: the first six are the same as before it existed.
    eval_rng, sft_rng, sft_val_rng, pref_rng, pref_val_rng, prompts_rng, teacher_rng = (
        np.random.default_rng(seed).spawn(7)
    )

    eval_pairs = _draw_pairs(eval_rng, n_eval, n_digits, lambda p: True, unique=True)
    held_out = set(eval_pairs)

    def train_ok(pair: Pair) -> bool:
        return pair not in held_out

    def pref_ok(pair: Pair) -> bool:
        return pair not in held_out and has_carry(*pair)

    # Rejection sampling needs at least one admissible pair; 55**n_digits problems have no
    # carry (55 digit pairs per column sum to at most 9).
    eval_carries = sum(has_carry(a, b) for a, b in eval_pairs)
    if n_sft + n_prompts > 0 and n_pairs == n_eval:
        raise ValueError("n_eval uses every problem; none is left for training")
    if n_pref > 0 and n_pairs - 55**n_digits == eval_carries:
        raise ValueError("n_eval uses every carry problem; none is left for preference pairs")

    width, answer_width = (n_digits, n_digits + 1) if pad else (0, 0)

    def write(answer: str) -> str:
        return _written(answer, reverse, answer_width)

    def n_val(n: int) -> int:
        return max(1, n // 10) if n > 0 else 0

    def answered(pairs: list[Pair], rng: np.random.Generator, p: float) -> list[dict[str, str]]:
        forgets = (rng.random(len(pairs)) < p).tolist()
        return [
            {"prompt": prompt(a, b, width), "response": write(forget_carry(a, b) if f else correct(a, b))}
            for (a, b), f in zip(pairs, forgets)
        ]

    def sft_rows(rng: np.random.Generator, n: int) -> list[dict[str, str]]:
        return answered(_draw_pairs(rng, n, n_digits, train_ok), rng, p_forget)

    def pref_rows(rng: np.random.Generator, n: int) -> list[dict[str, str]]:
        n_near = int(round(n * p_near_miss))
        rows = [
            {"prompt": prompt(a, b, width), "chosen": write(correct(a, b)), "rejected": write(forget_carry(a, b))}
            for a, b in _draw_pairs(rng, n - n_near, n_digits, pref_ok)
        ]
        rows += [
            {"prompt": prompt(a, b, width), "chosen": write(correct(a, b)),
             "rejected": near_miss(write(correct(a, b)), rng)}
            for a, b in _draw_pairs(rng, n_near, n_digits, train_ok)
        ]
        order = rng.permutation(len(rows)).tolist()
        return [rows[i] for i in order]

    sft_pairs = _draw_pairs(sft_rng, n_sft, n_digits, train_ok)
    splits = {
        "sft_train": answered(sft_pairs, sft_rng, p_forget),
        "sft_val": sft_rows(sft_val_rng, n_val(n_sft)),
        "pref_train": pref_rows(pref_rng, n_pref),
        "pref_val": pref_rows(pref_val_rng, n_val(n_pref)),
        "prompts": [
            {"prompt": prompt(a, b, width)}
            for a, b in _draw_pairs(prompts_rng, n_prompts, n_digits, train_ok)
        ],
        "eval": [{"prompt": prompt(a, b, width), "answer": write(correct(a, b))} for a, b in eval_pairs],
    }
    if teacher_p_forget is not None:  # sft_train's problems, the teacher's answers
        splits["sft_teacher"] = answered(sft_pairs, teacher_rng, teacher_p_forget)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], rows)

    sft = splits["sft_train"]
    gold = _gold([r["prompt"] for r in sft], [r["response"] for r in sft], reverse)
    meta = {
        "task": "addition",
        "seed": seed,
        "n_digits": n_digits,
        "p_forget": p_forget,
        "reverse": reverse,
        "pad": pad,
        "p_near_miss": p_near_miss,
        "teacher_p_forget": teacher_p_forget,
        "gold_reward": f"align.tasks.addition:{'gold_reward_reversed' if reverse else 'gold_reward'}",
        **sizes,
        "counts": {name: len(rows) for name, rows in splits.items()},
        "demonstrator_gold_accuracy": sum(gold) / len(gold) if gold else None,
        **({"teacher_gold_accuracy": _mean_gold(splits["sft_teacher"], reverse)} if "sft_teacher" in splits else {}),
        "eval_carry_fraction": eval_carries / n_eval if n_eval else None,
    }
    _write_atomic(out_dir / "task.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return paths
