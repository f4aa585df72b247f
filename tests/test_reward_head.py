"""Reward models outside align (issue 15, bug 4): the normalisation is folded into the score head
where the head has a bias, the rest stays in align_reward.json, and the model card's snippet, run
with plain transformers, reproduces align's score."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from align.config import PPOConfig, RMConfig, from_dict
from align.generation import Rollout, left_pad
from align.reward import NORMALIZATION_FILE, Reward

TEMPLATE = "Q: {prompt}\nA: "
PAIRS = [("1?", "ab"), ("27?", "aaab"), ("5?", "b")]
"""(prompt, response) pairs scored by both align and the card's snippet."""
NORM = [("1?", "ab"), ("2?", "bbb")]
"""The `normalize_with` responses."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"{rng.randint(0, 99)}?", "chosen": "a" * rng.randint(1, 5), "rejected": "b" * rng.randint(1, 5)}
            for _ in range(48)]
    return {"train": write_jsonl(root / "train.jsonl", rows),
            "norm": write_jsonl(root / "norm.jsonl", [{"prompt": p, "response": r} for p, r in NORM])}


def train_tiny_rm(out: Path, base: Path, pairs: dict[str, Path]) -> Path:
    from align.rm import train_rm

    cfg = from_dict(RMConfig, {
        "output_dir": str(out), "seed": 0, "model": {"path": str(base)}, "normalize_with": str(pairs["norm"]),
        "data": {"train": str(pairs["train"]), "val_fraction": 0.0, "max_length": 16, "prompt_template": TEMPLATE},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 3e-3, "log_every": 1, "mixed_precision": "no"}})
    cfg.validate()
    train_rm(cfg)
    return out / "model"


def align_scores(rm_dir: Path, normalize: bool = True, pairs: list[tuple[str, str]] = PAIRS) -> torch.Tensor:
    """Scores through align's one reward path (what PPO, best-of-n and eval use), on rollouts built
    as PPO builds them: [BOS] + templated prompt ids, then response ids + EOS."""
    from align.data import bos_prefix

    cfg = from_dict(PPOConfig, {"output_dir": "x", "model": {"path": str(rm_dir)}, "data": {"train": "x"},
                                "reward": {"model": str(rm_dir), "normalize": normalize}})
    reward = Reward.from_ppo(cfg, tokenizer := reward_tokenizer(rm_dir), torch.device("cpu"))
    prompts = [bos_prefix(tokenizer) + tokenizer(TEMPLATE.format(prompt=p), add_special_tokens=False).input_ids
               for p, _ in pairs]
    responses = [tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for _, r in pairs]
    p_ids, p_mask = left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    width = max(map(len, responses))
    r_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in responses])
    r_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    rollout = Rollout(p_ids, p_mask, r_ids, r_mask, torch.ones(len(pairs), dtype=torch.bool))
    texts = [p for p, _ in pairs]
    return reward.scores(texts, [r for _, r in pairs], rollout, texts)


def reward_tokenizer(path: Path) -> Any:
    from align.modeling import load_tokenizer

    return load_tokenizer(str(path))


def card_snippet(model_dir: Path) -> str:
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    (snippet,) = [b for b in blocks if "AutoModelForSequenceClassification" in b]
    return snippet


def run_snippet(model_dir: Path) -> list[float]:
    """The card's code, verbatim, from the model directory (its `path = "."`), with plain transformers."""
    namespace: dict[str, Any] = {}
    old = os.getcwd()
    os.chdir(model_dir)
    try:
        exec(card_snippet(model_dir), namespace)
        return [namespace["reward"](p, r) for p, r in PAIRS]
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def bos_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer that adds BOS to a plain encode (as Llama's does), so the
    snippet must prepend it as align does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos") / "base"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok._tokenizer.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", tok.bos_token_id)])
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("a").input_ids[0] == tok.bos_token_id
    return path


def test_card_snippet_reproduces_aligns_score_with_plain_transformers(bos_base: Path, pairs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    model_dir = train_tiny_rm(tmp_path / "rm", bos_base, pairs)
    saved = json.loads((model_dir / NORMALIZATION_FILE).read_text())
    # Llama's score head has no bias: the whole offset stays in the file, and the card carries it.
    assert saved["folded_into_head"] == 0.0 and abs(saved["bias"]) > 1e-3
    assert f"OFFSET = {saved['bias']!r}" in card_snippet(model_dir)
    assert "[tokenizer.bos_token_id] + tokenizer(text" in card_snippet(model_dir)
    want = align_scores(model_dir)
    assert torch.allclose(torch.tensor(run_snippet(model_dir)), want, atol=1e-5, rtol=0)
    # The plain classifier's output alone is off by the offset: the snippet's subtraction matters.
    raw = align_scores(model_dir, normalize=False)
    assert torch.allclose(raw - saved["bias"], want, atol=1e-6, rtol=0)


def test_a_file_without_folded_into_head_is_read_as_before(bos_base: Path, pairs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """align_reward.json as align wrote it before the fold: `bias` alone, subtracted when normalising."""
    model_dir = train_tiny_rm(tmp_path / "rm", bos_base, pairs)
    normalised, raw = align_scores(model_dir), align_scores(model_dir, normalize=False)
    (model_dir / NORMALIZATION_FILE).write_text(json.dumps({"bias": 0.25, "normalized_with": "x"}))
    assert torch.allclose(align_scores(model_dir), raw - 0.25, atol=1e-6, rtol=0)
    assert torch.equal(align_scores(model_dir, normalize=False), raw)
    assert not torch.allclose(normalised, raw - 0.25)


# ----------------------------------------------------------------------------------------------
# An architecture whose score head has a bias: the offset is folded into it


_REGISTERED = False


def register_biased_llama() -> None:
    """A Llama whose sequence classifier's head has a bias (as a remote-code model's may), registered
    with the Auto classes so that align and plain transformers load it by its config."""
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel)

    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True

    class BiasedLlamaConfig(LlamaConfig):
        model_type = "align_biased_llama"

    class BiasedLlamaModel(LlamaModel):
        config_class = BiasedLlamaConfig

    class BiasedLlamaForCausalLM(LlamaForCausalLM):
        config_class = BiasedLlamaConfig

    class BiasedLlamaForSequenceClassification(LlamaForSequenceClassification):
        config_class = BiasedLlamaConfig

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
            self.post_init()

    AutoConfig.register("align_biased_llama", BiasedLlamaConfig)
    AutoModel.register(BiasedLlamaConfig, BiasedLlamaModel)
    AutoModelForCausalLM.register(BiasedLlamaConfig, BiasedLlamaForCausalLM)
    AutoModelForSequenceClassification.register(BiasedLlamaConfig, BiasedLlamaForSequenceClassification)


@pytest.fixture(scope="module")
def biased_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    register_biased_llama()
    sizes = {k: v for k, v in AutoConfig.from_pretrained(tiny_model_dir).to_diff_dict().items()
             if k not in ("model_type", "architectures", "transformers_version")}
    config = AutoConfig.for_model("align_biased_llama", **sizes)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("biased") / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_the_offset_is_folded_into_a_score_head_with_a_bias_and_scores_do_not_change(
        biased_base: Path, pairs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification

    import align.rm

    folded_dir = train_tiny_rm(tmp_path / "folded", biased_base, pairs)
    with monkeypatch.context() as m:  # the same run as align saved it before the fold
        m.setattr(align.rm, "fold_score_offset", lambda model, offset: 0.0)
        unfolded_dir = train_tiny_rm(tmp_path / "unfolded", biased_base, pairs)

    folded = json.loads((folded_dir / NORMALIZATION_FILE).read_text())
    unfolded = json.loads((unfolded_dir / NORMALIZATION_FILE).read_text())
    assert folded["bias"] == 0.0 and folded["folded_into_head"] == pytest.approx(unfolded["bias"])
    assert abs(unfolded["bias"]) > 1e-3
    head = AutoModelForSequenceClassification.from_pretrained(folded_dir).score
    before = AutoModelForSequenceClassification.from_pretrained(unfolded_dir).score
    assert torch.equal(head.weight, before.weight)
    assert head.bias.item() == pytest.approx(before.bias.item() - folded["folded_into_head"], abs=1e-6)

    # The values align uses are the same before and after the fold, normalised or not ...
    assert torch.allclose(align_scores(folded_dir), align_scores(unfolded_dir), atol=1e-5, rtol=0)
    assert torch.allclose(align_scores(folded_dir, normalize=False), align_scores(unfolded_dir, normalize=False),
                          atol=1e-5, rtol=0)
    # ... the `normalize_with` responses still score 0 on average ...
    assert align_scores(folded_dir, pairs=NORM).mean().item() == pytest.approx(0.0, abs=1e-5)
    assert align_scores(folded_dir, normalize=False, pairs=NORM).mean().item() == pytest.approx(unfolded["bias"])
    # ... and the plain classifier's output is now align's normalised score, with nothing to subtract.
    assert "OFFSET = 0.0" in card_snippet(folded_dir)
    assert torch.allclose(torch.tensor(run_snippet(folded_dir)), align_scores(folded_dir), atol=1e-5, rtol=0)
