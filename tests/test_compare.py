"""`align compare` on hand-made eval outputs: no model is trained or loaded.

A fake pipeline root holds SFT and PPO run directories (metrics.jsonl, summary) and an eval
directory with results.json and responses, laid out as `align eval` writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from align.cli import main
from align.compare import compare, outcomes, win_rate
from align.errors import AlignError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["1+1=", "2+9=", "5+5=", "7+8="]
RESPONSES = {  # per model: (response, learned reward, gold reward) per prompt
    "sft": [("2", 1.0, 1.0), ("1", 0.0, 0.0), ("0", -1.0, 0.0), ("15", 2.0, 1.0)],
    "ppo": [("2", 1.0, 1.0), ("11", 3.0, 1.0), ("<script>alert(1)</script>", -2.0, 0.0), ("15", 2.5, 1.0)],
}
# ppo vs sft, learned reward: tie, win, loss, win -> (2 + 0.5) / 4; gold: tie, win, tie, tie -> 2.5 / 4.
EXPECTED_WIN = {"reward": 0.625, "gold_reward": 0.625}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_pipeline(root: Path, ppo_metrics: bool = True, with_kl: bool = True) -> Path:
    """A pipeline root: runs/sft, runs/ppo (model dirs, metrics) and eval/ (results.json, responses).
    Model paths are relative to the root, as when `align eval` ran there."""
    for name in RESPONSES:
        (root / "runs" / name / "model").mkdir(parents=True)
    write_jsonl(root / "runs" / "sft" / "metrics.jsonl", [{"step": 10, "train/loss": 2.0, "val/loss": 2.1}])
    if ppo_metrics:
        steps = [{"step": s, "objective/scores": 0.5 * s, "objective/kl": 0.1 * s, "objective/rlhf_reward": 0.4 * s,
                  "objective/kl_coef": 0.05} for s in range(1, 5)]
        evals = [{"step": s, "eval/reward": 1.0 + s, "eval/gold_reward": 0.5 - 0.1 * s, "eval/response_length": 2.0,
                  "eval/eos_rate": 1.0} for s in (2, 4)]
        write_jsonl(root / "runs" / "ppo" / "metrics.jsonl", steps[:2] + evals[:1] + steps[2:] + evals[1:])
    models = []
    for i, (name, rows) in enumerate(RESPONSES.items()):
        write_jsonl(root / "eval" / "responses" / f"{name}.jsonl",
                    [{"prompt": p, "response": r, "reward": s, "gold_reward": g}
                     for p, (r, s, g) in zip(PROMPTS, rows)])
        metrics = {"response_length": 2.0 + i, "eos_rate": 1.0, "reward": sum(r[1] for r in rows) / len(rows),
                   "gold_reward": sum(r[2] for r in rows) / len(rows), "val_loss": 1.5 + i, "perplexity": 4.48,
                   "token_accuracy": 0.6}
        if with_kl:
            metrics["kl_to_reference"] = 0.3 * i
        stages = ["sft", "ppo"][: i + 1]
        models.append({"name": name, "path": f"runs/{name}/model", "metrics": metrics,
                       "compute": {"wall_time_sec": 10.0 + 50 * i, "tokens": 12345, "episodes": 256 * i,
                                   "peak_memory_mb": 400.0 + i, "stages": stages},
                       "responses": f"responses/{name}.jsonl"})
    results = {"prompts": "data/eval.jsonl", "n_prompts": len(PROMPTS), "baseline": "sft", "has_reward": True,
               "has_gold": True, "wall_time_sec": 1.0, "peak_memory_mb": 300.0, "models": models}
    (root / "eval" / "results.json").write_text(json.dumps(results))
    return root


def test_win_rate_hand_made() -> None:
    assert outcomes([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, 0.0]) == (1, 2, 1)
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, 0.0]) == 0.5
    assert win_rate([3.0, 3.0], [1.0, 1.0]) == 1.0
    assert win_rate([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == 0.0
    scores = [0.3, -1.2, 5.0]
    assert win_rate(scores, scores) == 0.5  # a model against itself
    assert outcomes([1.0 + 1e-9], [1.0]) == (0, 1, 0)  # the same response rescored ties
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_report_from_pipeline_root(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe")
    result = compare([root])

    out = root / "report"  # the default: beside the eval directory
    assert result["out"] == str(out)
    assert result["win_rates"]["ppo"] == EXPECTED_WIN
    assert result["win_rates"]["sft"] == {"reward": None, "gold_reward": None}  # the baseline
    assert result["skipped"] == {}
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert str(out.parent) not in md and str(out.parent) not in page  # no machine paths in a report
    for text in (md, page):
        for name in RESPONSES:
            assert name in text
        assert "sft → ppo" in text and "0.62" in text and "12,345" in text
    assert "| sft | 0.5 |" in md and "| ppo | 1.125 |" in md  # every model's row, with its reward
    assert "0.62 (2 W / 1 T / 1 L)" in md
    for name in ("training_curves", "reward_kl_frontier", "gold_vs_learned"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 500 and im.size[1] > 300
        assert f"({name}.png)" in md
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page  # self-contained


def test_html_and_markdown_escape_model_output(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe")
    result = compare([root / "eval"], tmp_path / "out")
    page = Path(result["report_html"]).read_text()
    md = Path(result["report_md"]).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in md


def test_plots_skipped_without_data(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe", ppo_metrics=False, with_kl=False)
    result = compare([root])
    assert set(result["skipped"]) == {"training_curves", "reward_kl_frontier", "gold_vs_learned"}
    assert result["plots"] == {}
    md = (root / "report" / "report.md").read_text()
    assert md.count("_Skipped:") == 3


def test_several_inputs_keep_rows_distinct(tmp_path: Path) -> None:
    a = make_pipeline(tmp_path / "a")
    b = make_pipeline(tmp_path / "b")
    result = compare([a, b / "eval"], tmp_path / "out")
    names = [row[0] for row in result["table"]["rows"]]
    assert names == ["sft", "ppo", "sft (b)", "ppo (b)"]
    assert result["win_rates"]["ppo (b)"] == EXPECTED_WIN  # same prompts: paired with a's baseline


def test_missing_or_broken_results_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(AlignError, match=str(tmp_path / "nowhere")):
        compare([tmp_path / "nowhere"])
    root = make_pipeline(tmp_path / "pipe")
    (root / "eval" / "results.json").write_text("{not json")
    with pytest.raises(AlignError, match="results.json: cannot read JSON"):
        compare([root])


def test_cli_prints_table(tmp_path: Path) -> None:
    root = make_pipeline(tmp_path / "pipe")
    result = CliRunner().invoke(main, ["compare", str(root), "--out", str(tmp_path / "rep"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("model") and "win vs sft (gold)" in lines[0]
    assert lines[2].startswith("sft ") and lines[3].startswith("ppo ") and "sft → ppo" in lines[3]
    assert f"wrote {tmp_path / 'rep' / 'report.md'}" in result.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 2+9= |" in md and "| 5+5= |" not in md  # --samples 2

    missing = CliRunner().invoke(main, ["compare", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert f"error: {tmp_path / 'nowhere'}" in missing.output
