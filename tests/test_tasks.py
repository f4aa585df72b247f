"""The addition task: helpers against hand-worked examples, and `build`'s guarantees
(determinism, held-out eval, carry-only preference pairs, the demonstrator's accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.tasks import TASKS, get_task
from align.tasks.addition import build, correct, forget_carry, gold_reward, has_carry

SMALL = {"n_sft": 200, "n_pref": 200, "n_prompts": 100, "n_eval": 50}


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("addition")
    return out, build(out, seed=0)


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = build(tmp_path / "a", seed=7, **SMALL)
    b = build(tmp_path / "b", seed=7, **SMALL)
    c = build(tmp_path / "c", seed=8, **SMALL)
    for name in ("task.json", *(p.name for p in a.values())):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert all(a[k].read_bytes() != c[k].read_bytes() for k in a)


@pytest.mark.parametrize(
    ("a", "b", "flawed"),
    [
        (57, 68, "15"), (19, 1, "10"), (99, 1, "90"), (12, 34, "46"),
        (50, 50, "0"), (5, 68, "63"), (0, 0, "0"),
    ],
)
def test_forget_carry_hand_examples(a: int, b: int, flawed: str) -> None:
    assert forget_carry(a, b) == flawed
    assert correct(a, b) == str(a + b)


def test_has_carry_and_flaw_coincide_exactly_without_carry() -> None:
    assert has_carry(57, 68) and has_carry(19, 1) and has_carry(5, 5)
    assert not has_carry(12, 34) and not has_carry(0, 0) and not has_carry(45, 54)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    assert all((forget_carry(a, b) == correct(a, b)) == (not has_carry(a, b)) for a, b in pairs)
    # 55 of the 100 digit pairs sum to at most 9, independently per column.
    assert sum(not has_carry(a, b) for a, b in pairs) == 55**2


def test_gold_reward_hand_examples() -> None:
    prompts = ["57+68=", "57+68=", "12+34=", "User: 12+34=\nAssistant: ", "1+2=3\n40+5="]
    responses = ["125", "15", " 46\n", "46", "45"]
    assert gold_reward(prompts, responses) == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert gold_reward(["9+9="], ["18 0"]) == [0.0]


def test_gold_reward_errors() -> None:
    with pytest.raises(ValueError, match="prompt 1"):
        gold_reward(["1+1=", "what is one plus one?"], ["2", "2"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward(["1+1=", "2+2="], ["2"])


def test_splits_have_the_promised_shape(default_build: tuple[Path, dict[str, Path]]) -> None:
    _, paths = default_build
    rows = {name: read_jsonl(path) for name, path in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {
        "sft_train": 4000, "sft_val": 400, "pref_train": 4000, "pref_val": 400,
        "prompts": 2000, "eval": 200,
    }
    for r in rows["sft_train"] + rows["sft_val"]:
        a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
        assert r["prompt"] == f"{a}+{b}=" and 0 <= a < 100 and 0 <= b < 100
        assert r["response"] in (correct(a, b), forget_carry(a, b))
    for r in rows["eval"]:
        assert gold_reward([r["prompt"]], [r["answer"]]) == [1.0]
    assert len({r["prompt"] for r in rows["eval"]}) == 200


def test_pref_pairs_are_carry_problems_ranked_correct_first(
    default_build: tuple[Path, dict[str, Path]],
) -> None:
    _, paths = default_build
    pairs = read_jsonl(paths["pref_train"]) + read_jsonl(paths["pref_val"])
    prompts = [r["prompt"] for r in pairs]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    assert gold_reward(prompts, [r["chosen"] for r in pairs]) == [1.0] * len(pairs)
    assert gold_reward(prompts, [r["rejected"] for r in pairs]) == [0.0] * len(pairs)


def test_eval_is_disjoint_from_training(default_build: tuple[Path, dict[str, Path]]) -> None:
    _, paths = default_build
    eval_prompts = {r["prompt"] for r in read_jsonl(paths["eval"])}
    train = {r["prompt"] for k, p in paths.items() if k != "eval" for r in read_jsonl(p)}
    assert train and not eval_prompts & train


def test_demonstrator_accuracy_matches_theory(default_build: tuple[Path, dict[str, Path]]) -> None:
    out, _ = default_build
    meta = json.loads((out / "task.json").read_text(encoding="utf-8"))
    p_carry = sum(has_carry(a, b) for a in range(100) for b in range(100)) / 100**2
    expected = 1 - meta["p_forget"] * p_carry  # 0.5815 for the defaults
    # 4000 Bernoulli draws: one standard deviation is about 0.008.
    assert meta["demonstrator_gold_accuracy"] == pytest.approx(expected, abs=0.03)
    assert meta["eval_carry_fraction"] == pytest.approx(p_carry, abs=0.15)
    assert meta["counts"]["sft_train"] == meta["n_sft"] == 4000


def test_build_leaves_no_temp_files(default_build: tuple[Path, dict[str, Path]]) -> None:
    out, paths = default_build
    expected = sorted([*(p.name for p in paths.values()), "task.json"])
    assert sorted(p.name for p in out.iterdir()) == expected


def test_build_rejects_impossible_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_eval=101"):
        build(tmp_path, seed=0, n_digits=1, n_eval=101)
    with pytest.raises(ValueError, match="none is left"):
        build(tmp_path, seed=0, n_digits=1, n_eval=100)


def test_registry() -> None:
    assert get_task("addition") is TASKS["addition"] is build
    with pytest.raises(ValueError, match=r"unknown task 'subtraction'; known: addition"):
        get_task("subtraction")


def test_reversed_answers_are_written_least_significant_digit_first(tmp_path):
    from align.tasks.addition import build, gold_reward_reversed

    paths = build(tmp_path, seed=0, n_sft=50, n_pref=20, n_prompts=5, n_eval=10, reverse=True)
    pairs = [json.loads(line) for line in paths["pref_train"].read_text().splitlines()]
    for row in pairs:
        a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        assert row["chosen"] == str(a + b)[::-1]
    assert gold_reward_reversed(["57+68="], ["521"]) == [1.0]
    assert gold_reward_reversed(["57+68="], ["125"]) == [0.0]
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["reverse"] is True and meta["gold_reward"].endswith("gold_reward_reversed")


def test_near_miss_pairs_differ_from_the_correct_answer_in_one_digit(tmp_path):
    from align.tasks.addition import build

    paths = build(tmp_path, seed=1, n_sft=10, n_pref=200, n_prompts=5, n_eval=10, pad=True, reverse=True,
                  p_near_miss=0.5)
    rows = [json.loads(line) for line in paths["pref_train"].read_text().splitlines()]
    one_digit = [r for r in rows if sum(x != y for x, y in zip(r["chosen"], r["rejected"])) == 1
                 and len(r["chosen"]) == len(r["rejected"])]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert 0.4 * len(rows) <= len(one_digit) <= len(rows)  # the near misses (and some forget-carry)


def test_a_teacher_answers_the_same_problems_and_changes_no_other_split(tmp_path: Path) -> None:
    plain = build(tmp_path / "plain", seed=3, **SMALL)
    taught = build(tmp_path / "taught", seed=3, teacher_p_forget=0.0, **SMALL)
    assert set(taught) == {*plain, "sft_teacher"}
    for k in plain:  # the teacher has its own random stream: every other split is byte-identical
        assert taught[k].read_bytes() == plain[k].read_bytes(), k
    teacher, raw = read_jsonl(taught["sft_teacher"]), read_jsonl(taught["sft_train"])
    assert [r["prompt"] for r in teacher] == [r["prompt"] for r in raw]
    assert gold_reward([r["prompt"] for r in teacher], [r["response"] for r in teacher]) == [1.0] * len(teacher)
    meta = json.loads((tmp_path / "taught" / "task.json").read_text(encoding="utf-8"))
    assert meta["teacher_gold_accuracy"] == 1.0 and meta["teacher_p_forget"] == 0.0
    always_forgets = read_jsonl(build(tmp_path / "bad", seed=3, teacher_p_forget=1.0, **SMALL)["sft_teacher"])
    assert [r["response"] for r in always_forgets] == [forget_carry(*map(int, r["prompt"][:-1].split("+")))
                                                       for r in always_forgets]
    with pytest.raises(ValueError, match="teacher_p_forget must be in"):
        build(tmp_path / "x", seed=0, teacher_p_forget=1.5, **SMALL)
