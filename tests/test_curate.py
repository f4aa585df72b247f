"""`align curate`: the selection steps against hand-computed cases, the files it writes, its one-line
errors, and reward-model scores that are the ones `align rm` trained and normalised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import main
from align.curate import Item, normalise, select


def invoke(*args: str):
    """`align ARGS` in this process (click's runner): exit code, stdout and stderr as a subprocess gives them."""
    return CliRunner().invoke(main, list(args))


def items(*rows: tuple[str, str, float | None]) -> list[Item]:
    return [Item(normalise(p), normalise(f"{p}\n{r}"), s) for p, r, s in rows]


def test_normalise_folds_case_width_and_whitespace() -> None:
    assert normalise("  Hello\tWORLD \n") == "hello world"
    assert normalise("\ufb01ne \uff21") == "fine a"  # the "fi" ligature and a full-width A, by NFKC
    assert normalise("a  b") == normalise("A b") != normalise("ab")


def test_every_step_on_a_hand_computed_case() -> None:
    data = items(
        ("a", "1", 0.9),    # 0: duplicate of 1, which scores higher
        ("a", "1", 0.95),   # 1: kept (a's best)
        ("a", "2", 0.5),    # 2: a's third best: over max_per_prompt=2
        ("b", "1", 0.1),    # 3: below min_score
        ("b", "2", 0.3),    # 4: kept (b's best)
        ("c", "1", 0.8),    # 5: kept (c's best)
        ("a", "3", 0.7),    # 6: a's second best: round 2 of the coverage order, past the target
    )
    sel = select(data, min_score=0.2, dedup=True, max_per_prompt=2, target=3)
    assert sel.kept == [1, 4, 5]
    assert sel.dropped == {"below_min_score": [3], "duplicate": [0], "over_max_per_prompt": [2], "over_target": [6]}


def test_coverage_takes_every_prompt_once_before_any_twice() -> None:
    # p has the three best scores, but a target of 3 still covers q and r.
    data = items(("p", "1", 9.0), ("p", "2", 8.0), ("p", "3", 7.0), ("q", "1", 1.0), ("r", "1", 2.0))
    assert select(data, target=3).kept == [0, 3, 4]
    assert select(data, target=4).kept == [0, 1, 3, 4]  # round 2: p's second best


def test_ties_and_no_scores_keep_input_order() -> None:
    tied = items(("p", "x", 1.0), ("p", "X ", 1.0), ("p", "y", 1.0), ("q", "z", 1.0))
    sel = select(tied, max_per_prompt=1)
    assert sel.kept == [0, 3] and sel.dropped["duplicate"] == [1] and sel.dropped["over_max_per_prompt"] == [2]
    unscored = items(("p", "1", None), ("p", "2", None), ("q", "1", None))
    assert select(unscored, target=2).kept == [0, 2]
    assert select(unscored, dedup=False).kept == [0, 1, 2]


def test_a_threshold_keeps_a_score_equal_to_it() -> None:
    assert select(items(("p", "1", 0.5), ("q", "1", 0.4999)), min_score=0.5).kept == [0]


def test_too_few_left_or_missing_scores_are_errors() -> None:
    with pytest.raises(ValueError, match="only 1 of 2 records are left.*target 2"):
        select(items(("p", "1", 1.0), ("p", "1", 0.0)), target=2)
    with pytest.raises(ValueError, match="needs a score"):
        select(items(("p", "1", None)), min_score=0.0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "1+1=", "response": "2", "score": 1.0},
    {"prompt": "1+1=", "response": "2 ", "score": 0.5},   # a duplicate after normalising
    {"prompt": "1+1=", "response": "3", "score": -1.0},   # below the threshold
    {"prompt": "2+2=", "response": "4", "score": 0.8},
    {"prompt": "3+3=", "response": "6", "score": 0.2},
]


def test_cli_writes_the_kept_records_and_a_report(tmp_path: Path, align_cli) -> None:
    """As a subprocess once (`python -m align curate`), to see the whole command work."""
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    r = align_cli("curate", str(src), "--out", str(out), "--score-field", "score", "--min-score", "0",
                  "--target", "2")
    assert r.returncode == 0, r.stderr
    assert "kept 2 of 5 records (2 of 3 prompts)" in r.stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == [ROWS[0], ROWS[3]]
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert (report["kept"], report["dropped/below_min_score"], report["dropped/duplicate"],
            report["dropped/over_target"]) == (2, 1, 1, 1)
    assert report["examples_dropped"]["below_min_score"] == [f"{src}:3"]
    assert report["score_mean_kept"] == pytest.approx(0.9)


@pytest.mark.parametrize("args, message", [
    (["--score-field", "score", "--target", "9"], "only 4 of 5 records are left after the filters"),
    (["--score-field", "nope", "--min-score", "0"], "in.jsonl:1: score field 'nope' must be a finite number"),
    (["--min-score", "0"], "'min_score' needs a score"),
    (["--score-field", "score", "--reward-model", "x"], "at most one of config keys 'score_field' and 'reward_model'"),
    (["--target", "0"], "'target' must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    r = invoke("curate", str(src), "--out", str(out), *args)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out.jsonl.report.json").exists()


def test_existing_output_and_bad_records_are_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    (tmp_path / "taken.jsonl").write_text("keep me\n")
    r = invoke("curate", str(src), "--out", str(tmp_path / "taken.jsonl"))
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2="}])
    r = invoke("curate", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 2 and "bad.jsonl:2: missing field 'response'" in r.stderr


def test_reward_model_scores_are_the_trained_and_normalised_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With the reward model normalised on a file, that file's records score 0 on average through
    curate: the same sequences, the same last token, the same bias."""
    from align.config import CurateConfig, RMConfig, build_config, from_dict
    from align.curate import curate
    from align.rm import train_rm

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}?", "chosen": "a" * (1 + i % 3),
                                                    "rejected": "b" * (1 + i % 2)} for i in range(32)])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"{i}?", "response": "ab"[i % 2] * (1 + i % 4)}
                                                   for i in range(12)])
    rm = from_dict(RMConfig, {"output_dir": str(tmp_path / "rm"), "seed": 0, "model": {"path": str(tiny_model_dir)},
                              "normalize_with": str(demos), "data": {"train": str(pairs), "max_length": 16,
                                                                     "val_fraction": 0.0},
                              "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "mixed_precision": "no"}})
    train_rm(rm)
    report = curate(build_config(CurateConfig, {"data": str(demos), "out": str(tmp_path / "o.jsonl"),
                                                "reward_model": str(tmp_path / "rm"), "dedup": False,
                                                "batch_size": 5}))
    assert report["kept"] == 12 and report["score_mean_in"] == pytest.approx(0.0, abs=1e-4)
    scores = [json.loads(line)["score"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(set(round(s, 6) for s in scores)) > 1  # a real score per record, not a constant
