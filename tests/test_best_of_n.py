"""Best-of-n: n = 1 is plain sampling, n > 1 keeps the reward's favourite; `align sample` writes SFT
data; `align eval` reports a best-of-n row with its sampling cost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from align import data as D
from align.reward import Reward, call_reward_function
from align.config import EvalConfig, ModelConfig, from_dict
from align.generation import decode_responses, sample
from align.runtime import set_seed

TEMPLATE = "Q: {prompt}\nA: "
REWARD = "toy_rewards:char_sum"


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, addition_data: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from align.modeling import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)), tokenizer, trainable=False)
    prompts, _ = D.load_prompts(str(addition_data["eval"]), "auto", TEMPLATE, tokenizer, 32, "drop")
    reward = Reward(tokenizer, torch.device("cpu"), function=REWARD)
    return {"model": model, "tokenizer": tokenizer, "prompts": prompts[:6], "reward": reward}


def test_best_of_one_is_plain_sampling(setup: dict[str, Any]) -> None:
    from align.best_of_n import best_of_n

    m, tok, prompts = setup["model"], setup["tokenizer"], setup["prompts"]
    set_seed(3)
    result = best_of_n(m, tok, prompts, setup["reward"], 1, 6, temperature=1.0, batch_size=len(prompts))
    set_seed(3)
    plain = decode_responses(tok, sample(m, tok, [q.ids for q in prompts], 6, temperature=1.0))
    assert result.responses == plain
    assert result.episodes == len(prompts) and result.tokens_generated > 0


def test_best_of_n_keeps_the_response_the_reward_prefers(setup: dict[str, Any]) -> None:
    from align.best_of_n import best_of_n

    m, tok, prompts, n = setup["model"], setup["tokenizer"], setup["prompts"], 5
    set_seed(7)
    rollout = sample(m, tok, [q.ids for q in prompts for _ in range(n)], 6, temperature=1.0)
    candidates = decode_responses(tok, rollout)
    scores = call_reward_function(__import__("toy_rewards").char_sum, REWARD, [""] * len(candidates), candidates)
    expected = [candidates[i * n + int(scores[i * n:(i + 1) * n].argmax())] for i in range(len(prompts))]
    assert expected != candidates[::n], "the test needs a prompt whose best response is not its first sample"
    set_seed(7)
    result = best_of_n(m, tok, prompts, setup["reward"], n, 6, temperature=1.0, batch_size=len(prompts))
    assert result.responses == expected
    assert torch.equal(result.scores, result.candidate_scores.max(1).values)
    assert result.episodes == n * len(prompts)


def test_sample_cli_writes_sft_data(tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path: Path,
                                    align_cli: Any) -> None:
    out = tmp_path / "bon.jsonl"
    tests_dir = Path(__file__).resolve().parent
    r = align_cli("sample", str(tiny_model_dir), "--prompts", str(addition_data["eval"]), "--best-of", "3",
                  "--out", str(out), "--reward-function", REWARD, "--template", TEMPLATE, "--max-new-tokens", "4",
                  "--max-samples", "4", cwd=tests_dir)
    assert r.returncode == 0, r.stderr
    assert "best-of-3" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(set(row) == {"prompt", "response", "score"} for row in rows)
    records = D.read_records(str(out))
    assert D.detect_format(records) == "prompt_response"
    again = align_cli("sample", str(tiny_model_dir), "--prompts", str(addition_data["eval"]), "--out", str(out),
                      "--reward-function", REWARD, cwd=tests_dir)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_eval_reports_a_best_of_n_row_with_its_cost(tiny_model_dir: Path, addition_data: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from align.compare import compare
    from align.evaluate import evaluate_models

    cfg = from_dict(EvalConfig, {"output_dir": str(tmp_path / "eval"), "models": [str(tiny_model_dir)],
                                 "prompts": str(addition_data["eval"]), "prompt_template": TEMPLATE,
                                 "reward_function": REWARD, "response_length": 4, "max_samples": 4, "best_of": 3})
    cfg.validate()
    results = evaluate_models(cfg)
    rows = {m["name"]: m for m in results["models"]}
    assert set(rows) == {"tiny", "tiny (best-of-3)"}
    bon = rows["tiny (best-of-3)"]
    assert bon["metrics"]["best_of_n"] == 3 and bon["compute"]["episodes"] == 12
    assert bon["compute"]["tokens_generated"] > 0 and bon["compute"]["stages"][-1] == "best-of-3"
    report = compare([str(tmp_path / "eval")], str(tmp_path / "report"), samples=2)
    assert "tiny (best-of-3)" in report["table"]["text"]


def test_best_of_needs_a_reward() -> None:
    from align.errors import ConfigError

    cfg = from_dict(EvalConfig, {"output_dir": "x", "models": ["m"], "prompts": "p", "best_of": 4})
    with pytest.raises(ConfigError, match="best_of"):
        cfg.validate()


def test_eval_draws_a_best_of_n_curve_once(tiny_model_dir: Path, addition_data: dict[str, Path],
                                           tmp_path: Path) -> None:
    from align.evaluate import evaluate_models
    from align.stats import best_of_n_estimate

    cfg = from_dict(EvalConfig, {"output_dir": str(tmp_path / "eval"), "models": [str(tiny_model_dir)],
                                 "prompts": str(addition_data["eval"]), "prompt_template": TEMPLATE,
                                 "reward_function": REWARD, "gold_reward": "toy_rewards:fraction_of_sevens",
                                 "response_length": 4, "max_samples": 3, "best_of_curve": [4, 1, 2]})
    cfg.validate()
    results = evaluate_models(cfg)
    assert [m["name"] for m in results["models"]] == ["tiny"]  # the curve is not a model row
    (curve,) = results["best_of_curves"]
    assert curve["model"] == "tiny" and curve["samples"] == 4
    rows = [json.loads(line) for line in (tmp_path / "eval" / curve["responses"]).read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == len(r["gold_reward"]) == 4 for r in rows)
    # the candidates' scores are the reward function's, and each point is their estimate
    assert rows[0]["reward"] == [float(sum(map(ord, t))) for t in rows[0]["responses"]]
    points = {p["n"]: p for p in curve["points"]}
    assert list(points) == [1, 2, 4]
    assert points[1]["metrics"]["reward"] == pytest.approx(sum(sum(r["reward"]) / 4 for r in rows) / 3)
    assert points[4]["metrics"]["reward"] == pytest.approx(sum(max(r["reward"]) for r in rows) / 3)
    assert points[2]["metrics"]["gold_reward"] == pytest.approx(
        sum(best_of_n_estimate(r["score"], r["gold_reward"], 2) for r in rows) / 3)
    assert points[1]["metrics"]["kl_bound"] == 0.0
    total = sum(sum(r["response_length"]) for r in rows)
    for n, p in points.items():
        assert p["compute"]["episodes"] == 3 * n and p["compute"]["tokens_generated"] == round(total * n / 4)


def test_best_of_curve_is_checked() -> None:
    from align.errors import ConfigError

    base = {"output_dir": "x", "models": ["m"], "prompts": "p"}
    with pytest.raises(ConfigError, match="'best_of_curve' needs a reward"):
        from_dict(EvalConfig, {**base, "best_of_curve": [1, 2]}).validate()
    with pytest.raises(ConfigError, match="every n must be an integer >= 1"):
        from_dict(EvalConfig, {**base, "reward_function": REWARD, "best_of_curve": [0, 2]}).validate()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_a_vllm_sampler_without_vllm_is_one_line_before_any_weight_loads(
        tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path: Path, align_cli: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`align sample --set engine=vllm` and eval's `best_of_engine: vllm` stop on the engine's check,
    naming their own key, before a model is loaded and before anything is written."""
    from align import evaluate
    from align.errors import AlignError
    from align.evaluate import evaluate_models

    out = tmp_path / "bon.jsonl"
    r = align_cli("sample", str(tiny_model_dir), "--prompts", str(addition_data["eval"]), "--out", str(out),
                  "--reward-function", REWARD, "--template", TEMPLATE, "--set", "engine=vllm",
                  cwd=Path(__file__).resolve().parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config key 'engine': vllm needs vLLM, which is not installed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()

    def no_loading(*a: Any, **k: Any) -> None:
        raise AssertionError("weights were loaded before the engine's check")

    monkeypatch.setattr(evaluate, "load_pretrained", no_loading)
    monkeypatch.setattr(evaluate, "Reward", no_loading)
    cfg = from_dict(EvalConfig, {"output_dir": str(tmp_path / "eval"), "models": [str(tiny_model_dir)],
                                 "prompts": str(addition_data["eval"]), "prompt_template": TEMPLATE,
                                 "reward_function": REWARD, "response_length": 4, "best_of_curve": [1, 2],
                                 "best_of_engine": "vllm"})
    cfg.validate()
    with pytest.raises(AlignError, match="config key 'best_of_engine': vllm needs vLLM"):
        evaluate_models(cfg)
    assert not (tmp_path / "eval" / "results.json").exists()
