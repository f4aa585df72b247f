"""The reward-model stage: it learns to rank, reads the last real token, normalises, saves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from align.config import RMConfig, from_dict
from align.rm import NORMALIZATION_FILE, sequence_scores, train_rm
from align.rundir import read_metrics


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Chosen answers are runs of 'a', rejected runs of 'b' (lengths vary, so length is no cue)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("pairs")

    def rows(n: int) -> list[dict]:
        return [{"prompt": f"{rng.randint(0, 99)}?", "chosen": "a" * rng.randint(1, 5),
                 "rejected": "b" * rng.randint(1, 5)} for _ in range(n)]

    return {"train": write_jsonl(root / "train.jsonl", rows(256)), "val": write_jsonl(root / "val.jsonl", rows(64)),
            "norm": write_jsonl(root / "norm.jsonl", [{"prompt": "1?", "response": "ab"}, {"prompt": "2?", "response": "ba"}])}


def rm_config(out: Path, model: Path, pairs: dict[str, Path], **overrides: object) -> RMConfig:
    data = {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "data": {"train": str(pairs["train"]), "validation": str(pairs["val"]), "max_length": 16},
            "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "eval_every": 20, "log_every": 5,
                      "mixed_precision": "no"}}
    data.update(overrides)
    cfg = from_dict(RMConfig, data)
    cfg.validate()
    return cfg


def test_reward_model_learns_to_rank_held_out_pairs(tiny_model_dir, toy_pairs, tmp_path):
    summary = train_rm(rm_config(tmp_path / "rm", tiny_model_dir, toy_pairs))
    rows = [r for r in read_metrics(tmp_path / "rm" / "metrics.jsonl") if "val/accuracy" in r]
    assert rows[-1]["val/accuracy"] >= 0.9, rows  # chance is 0.5
    assert rows[-1]["val/loss"] < rows[0]["val/loss"]
    assert summary["val/margin"] > 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert model.config.num_labels == 1


def test_normalisation_makes_reference_responses_score_zero(tiny_model_dir, toy_pairs, tmp_path, tokenizer):
    cfg = rm_config(tmp_path / "rm", tiny_model_dir, toy_pairs, normalize_with=str(toy_pairs["norm"]))
    cfg.train.max_steps = 5
    train_rm(cfg)
    bias = json.loads((tmp_path / "rm" / "model" / NORMALIZATION_FILE).read_text())["bias"]
    from align.config import ModelConfig, PPOConfig
    from align.reward import Reward
    from align.generation import left_pad, Rollout

    ppo_cfg = from_dict(PPOConfig, {"output_dir": "x", "model": {"path": str(tiny_model_dir)}, "data": {"train": "x"},
                                    "reward": {"model": str(tmp_path / "rm")}})
    reward = Reward.from_ppo(ppo_cfg, tokenizer, torch.device("cpu"))
    assert reward.bias == pytest.approx(bias)
    ids = [[*tokenizer(p, add_special_tokens=False).input_ids] for p in ("1?", "2?")]
    resp = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in ("ab", "ba")]
    p_ids, p_mask = left_pad(ids, tokenizer.pad_token_id, torch.device("cpu"))
    r_ids = torch.tensor(resp)
    rollout = Rollout(p_ids, p_mask, r_ids, torch.ones_like(r_ids), torch.ones(2, dtype=torch.bool))
    scores = reward.scores(["1?", "2?"], ["ab", "ba"], rollout, ["1?", "2?"])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_score_is_read_at_the_last_real_token_whatever_the_padding(tiny_model_dir, tokenizer):
    from align.config import LoraConfig, ModelConfig
    from align.modeling import load_score_model

    model = load_score_model(ModelConfig(path=str(tiny_model_dir)), LoraConfig(), tokenizer, torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 0, 0]])
    with torch.no_grad():
        a = sequence_scores(model, ids, torch.ones_like(ids))
        b = sequence_scores(model, padded, torch.tensor([[1, 1, 1, 1, 0, 0]] * 2))
        c = sequence_scores(model, ids[:, :3], torch.ones_like(ids[:, :3]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # reading a different token gives a different score


def test_lora_reward_model_saves_a_merged_classifier(tiny_model_dir, toy_pairs, tmp_path):
    cfg = rm_config(tmp_path / "rm", tiny_model_dir, toy_pairs,
                    lora={"enabled": True, "r": 4, "alpha": 8, "target": "all"})
    cfg.train.max_steps = 4
    summary = train_rm(cfg)
    assert summary["steps"] == 4
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_preference_records_with_identical_sides_are_rejected(tiny_model_dir, toy_pairs, tmp_path):
    from align.errors import AlignError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1?", "chosen": "a", "rejected": "a"}] * 4)
    cfg = rm_config(tmp_path / "rm", tiny_model_dir, {**toy_pairs, "train": bad})
    with pytest.raises(AlignError, match=r"bad.jsonl:1: 'chosen' and 'rejected' are identical"):
        train_rm(cfg)
    assert not (tmp_path / "rm" / "model").exists()
