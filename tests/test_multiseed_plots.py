"""The multi-seed report's win-rate chart and best-of-n curve, on hand-made seed directories: no
model is trained or loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align.multiseed import curve_name, render_markdown, seed_runs, summarize, values, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# per seed, per model: (response, learned reward, gold reward) per prompt
SEEDS: dict[int, dict[str, list[tuple[str, float, float]]]] = {
    # ppo vs sft, gold: win, tie, tie, loss; learned reward: win, tie (same response, last bits apart), loss, loss
    0: {"sft": [("a", 0.0, 0.0), ("b", 1.0, 1.0), ("c", 2.0, 0.0), ("d", 3.0, 1.0)],
        "sft+ppo": [("A", 1.0, 1.0), ("b", 1.0 + 1e-7, 1.0), ("C", 1.0, 0.0), ("D", 2.0, 0.0)]},
    # gold: win, win, tie, loss; learned reward: win, win, tie (different responses, equal scores), loss
    1: {"sft": [("a", 0.0, 0.0), ("b", 0.0, 0.0), ("c", 1.0, 1.0), ("d", 1.0, 1.0)],
        "sft+ppo": [("A", 1.0, 1.0), ("B", 2.0, 1.0), ("C", 1.0, 1.0), ("D", 0.0, 0.0)]},
}
# best-of-n candidates of sft: per prompt, (choosing score, gold) of each of 4 samples
CANDIDATES = [[(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (4.0, 1.0)], [(4.0, 1.0), (3.0, 0.0), (2.0, 0.0), (1.0, 1.0)],
              [(1.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)], [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]]
# hand-computed best-of-n gold per prompt. n = 1: the mean. n = 2: sorted ascending, the k-th is kept with
# probability (k-1)/6: prompt 0 -> 3/6, prompt 1 -> 3/6 (score 4 is gold 1), prompt 2 -> the tied top three
# share 1 - 0 = 1 with mean 1/3, prompt 3 -> 1. n = 4: the top score's gold (prompt 2: the tie's mean).
CURVE_GOLD = {1: [0.25, 0.5, 0.5, 1.0], 2: [0.5, 0.5, 1 / 3, 1.0], 4: [1.0, 1.0, 1 / 3, 1.0]}


def fake_seed(root: Path, seed: int) -> None:
    eval_dir = root / f"seed-{seed}" / "eval"
    (eval_dir / "responses").mkdir(parents=True)
    models = []
    for name, rows in SEEDS[seed].items():
        lines = [{"prompt": f"p{i}", "response": r, "reward": s, "gold_reward": g} for i, (r, s, g) in enumerate(rows)]
        (eval_dir / "responses" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        models.append({"name": name, "metrics": {"gold_reward": sum(g for *_, g in rows) / 4,
                                                 "reward": sum(s for _, s, _ in rows) / 4,
                                                 "kl_to_reference": 0.5 if name != "sft" else 0.0},
                       "responses": f"responses/{name}.jsonl", "compute": {"wall_time_sec": 1.0}})
    curve_rows = [{"prompt": f"p{i}", "responses": ["x"] * 4, "score": [c[0] for c in cands],
                   "reward": [c[0] for c in cands], "gold_reward": [c[1] for c in cands]}
                  for i, cands in enumerate(CANDIDATES)]
    (eval_dir / "responses" / "sft.best-of-curve.jsonl").write_text("".join(json.dumps(x) + "\n" for x in curve_rows))
    points = [{"n": n, "metrics": {"gold_reward": sum(g) / 4, "kl_bound": 0.1 * n},
               "compute": {"wall_time_sec": 1.0, "tokens": 100 + n, "episodes": 4 * n, "tokens_generated": 3 * n + seed}}
              for n, g in CURVE_GOLD.items()]
    results = {"n_prompts": 4, "baseline": "sft", "models": models, "has_gold": True, "has_reward": True,
               "best_of_curves": [{"model": "sft", "samples": 4, "responses": "responses/sft.best-of-curve.jsonl",
                                   "points": points}]}
    (eval_dir / "results.json").write_text(json.dumps(results))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for seed in SEEDS:
        fake_seed(tmp_path, seed)
    return tmp_path


def test_win_tie_loss_counts_by_hand(root: Path) -> None:
    s = summarize(seed_runs(root))
    gold, reward = s.paired["sft+ppo"], s.paired_reward["sft+ppo"]
    assert (gold.wins, gold.ties, gold.losses) == (3, 3, 2)
    assert (reward.wins, reward.ties, reward.losses) == (3, 2, 3)  # the same response "b" ties, not wins
    assert gold.mean_diff == pytest.approx(((1 - 1) / 4 + (2 - 1) / 4) / 2)
    assert not gold.significant  # 3 wins against 2 losses say nothing
    text = render_markdown(s)
    assert "## Against sft (learned reward, paired by prompt and seed)" in text
    assert "| sft+ppo | " in text and "| 3 / 3 / 2 |" in text


def test_best_of_n_curve_points_from_the_candidates(root: Path) -> None:
    runs = seed_runs(root)
    for n, gold in CURVE_GOLD.items():
        assert runs[0].curve_per_prompt("sft", n) == pytest.approx(gold)
    s = summarize(runs)
    points = s.curves["sft"]
    assert [p.n for p in points] == [1, 2, 4] and s.curve_samples["sft"] == 4
    assert points[2].intervals["compute/tokens_generated"].mean == pytest.approx(12.5)  # seeds 0, 1: 12 and 13
    # n = 4 against sft's greedy gold, prompt by prompt: seed 0 (1, 1, 1/3, 1) - (0, 1, 0, 1), seed 1 - (0, 0, 1, 1)
    pair = points[2].paired
    assert (pair.wins, pair.ties, pair.losses) == (4, 3, 1)
    assert values(runs)[1][f"{curve_name('sft', 2)}:gold_reward"] == pytest.approx(sum(CURVE_GOLD[2]) / 4)
    text = render_markdown(s)
    assert "## Best-of-n from sft, n = 1, 2, 4" in text
    assert "| 4 | 0.833 [0.833, 0.833] | — | 0.400 | 16 | 12 |" in text  # both seeds drew the same candidates


def test_report_writes_the_plots(root: Path) -> None:
    report = write_report(root, root / "report")
    for name in ("gold_vs_kl", "matched_compute", "win_rates"):
        path = root / "report" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        assert f"![{name}]({name}.png)" in report["text"]


def test_curves_must_match_across_seeds(root: Path) -> None:
    from align.errors import AlignError

    path = root / "seed-1" / "eval" / "results.json"
    results: dict[str, Any] = json.loads(path.read_text())
    results["best_of_curves"][0]["points"] = results["best_of_curves"][0]["points"][:2]
    path.write_text(json.dumps(results))
    with pytest.raises(AlignError, match="seed 1 drew other best-of-n curves"):
        summarize(seed_runs(root))
