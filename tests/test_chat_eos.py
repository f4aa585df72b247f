"""A chat template that closes assistant turns with a token other than EOS (Gemma's `<end_of_turn>`):
chat SFT and DPO make that token the EOS (`align.modeling.stop_at_turn_end`), so the trained model
stops where it was taught to, in align and in tools that read its saved configs.

The detection itself (`align.data.turn_end_token`) is tested on each family's template in
tests/test_data.py; tests/test_architectures.py's `chat` and `sft_lora` checks run it on every
architecture, the second through a LoRA SFT run whose adapter directory carries the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from architectures import FAMILIES, build_tiny, build_tokenizer

GEMMA_SAYS = "EOS is now '<end_of_turn>', the token the chat template closes assistant turns with (was '<eos>')"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("gemma2", tmp_path_factory.mktemp("gemma") / "init")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict[str, Any]]:
    """One-digit additions as one-exchange conversations."""
    return [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
            for a, b in [(i % 10, (3 * i) % 10) for i in range(n)]]


def test_gemma_end_of_turn_becomes_eos_and_is_saved(gemma: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from align.modeling import load_tokenizer, stop_at_turn_end

    tok = load_tokenizer(str(gemma))
    size = len(tok)
    assert stop_at_turn_end(tok) == GEMMA_SAYS
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<end_of_turn>") and tok.pad_token == "<pad>"
    assert len(tok) == size  # nothing added
    assert stop_at_turn_end(tok) is None  # done once: EOS now closes the turn
    tok.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").eos_token == "<end_of_turn>"


def test_eos_that_already_closes_the_turn_is_left_alone() -> None:
    from align.modeling import stop_at_turn_end

    for family in ("llama", "qwen2"):  # Llama 3's <|eot_id|>, ChatML's <|im_end|>
        tok = build_tokenizer(FAMILIES[family], FAMILIES[family].pad)
        eos = tok.eos_token
        assert stop_at_turn_end(tok) is None and tok.eos_token == eos
    plain = build_tokenizer(FAMILIES["llama"], "missing")
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    assert stop_at_turn_end(plain) is None and plain.eos_token == "<|eot_id|>"


def test_a_pad_that_was_the_turn_end_is_chosen_again() -> None:
    """EOS never pads: once `<end_of_turn>` is EOS, a tokenizer that padded with it gets an unused
    token of its vocabulary (here `<pad>`) instead."""
    from align.modeling import stop_at_turn_end

    tok = build_tokenizer(FAMILIES["gemma2"], "present")
    tok.pad_token = "<end_of_turn>"
    size = len(tok)
    assert stop_at_turn_end(tok) == GEMMA_SAYS
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id and len(tok) == size


def test_a_tokenizer_without_eos_gets_the_turn_end() -> None:
    from align.modeling import stop_at_turn_end

    tok = build_tokenizer(FAMILIES["gemma2"], "present")
    tok.eos_token = None
    assert stop_at_turn_end(tok) == ("EOS is now '<end_of_turn>', the token the chat template closes assistant "
                                     "turns with (there was none)")
    assert tok.eos_token == "<end_of_turn>"


def test_stop_at_eos_lists_the_tokenizer_eos_first_where_missing() -> None:
    from transformers import GenerationConfig, PretrainedConfig

    from align.modeling import stop_at_eos

    model = SimpleNamespace(config=PretrainedConfig(eos_token_id=1),
                            generation_config=GenerationConfig(eos_token_id=[1, 5]))
    stop_at_eos(model, SimpleNamespace(eos_token_id=5))
    assert model.config.eos_token_id == [5, 1]  # the old EOS stays a stop id
    assert model.generation_config.eos_token_id == [1, 5]  # already stops at 5 (Gemma's checkpoints)
    classifier = SimpleNamespace(config=PretrainedConfig(eos_token_id=None), generation_config=None)
    stop_at_eos(classifier, SimpleNamespace(eos_token_id=7))
    assert classifier.config.eos_token_id == 7


@pytest.mark.slow
def test_chat_sft_on_gemma_learns_to_stop_and_generate_stops_there(gemma: Path, tmp_path: Path) -> None:
    """`align sft` (full weights) on chat records: the first line says EOS changed, the saved
    tokenizer and config.json carry it, and `align generate --chat` ends the reply at it (before the
    fix, sampling ran on to `<eos>`, which the model never learns, and printed `<end_of_turn>`)."""
    import yaml

    from align.cli import main

    cfg = {"output_dir": str(tmp_path / "sft"), "seed": 0, "model": {"path": str(gemma)},
           "data": {"train": str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(48))), "val_fraction": 0.0,
                    "max_length": 64},
           "train": {"batch_size": 8, "lr": 1.0e-2, "max_steps": 60, "eval_every": 1000, "log_every": 1000,
                     "save_every": 1000, "mixed_precision": "no"}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["sft", str(tmp_path / "sft.yaml")])
    assert result.exit_code == 0, result.output[-2000:]
    assert f"sft: format chat; {GEMMA_SAYS}; train: 48 examples" in result.output
    model = tmp_path / "sft" / "model"
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<end_of_turn>" and tok_config["pad_token"] == "<pad>"
    end, eos = (FAMILIES["gemma2"].specials.index(t) for t in ("<end_of_turn>", "<eos>"))
    assert json.loads((model / "config.json").read_text())["eos_token_id"] == [end, eos]
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"] == [eos, end]

    out = runner.invoke(main, ["generate", str(model), "--chat", "--prompt", "3+4=", "--max-new-tokens", "6"])
    assert out.exit_code == 0, out.output[-2000:]
    reply = out.output.strip().removeprefix("3+4=")
    assert reply.isdigit() and len(reply) <= 2, f"the reply did not end at EOS: {out.output!r}"


@pytest.mark.slow
def test_dpo_on_chat_pairs_makes_the_turn_end_eos(gemma: Path, tmp_path: Path) -> None:
    from align.config import DPOStageConfig, from_dict
    from align.dpo import train_dpo

    def pair(a: int, b: int) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "chosen": [{"role": "assistant", "content": str(a + b)}],
                "rejected": [{"role": "assistant", "content": str(a + b + 1)}]}

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(i % 10, (7 * i) % 10) for i in range(12)])
    cfg = from_dict(DPOStageConfig, {
        "output_dir": str(tmp_path / "dpo"), "seed": 0, "model": {"path": str(gemma)},
        "data": {"train": str(pairs), "val_fraction": 0.0, "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 1000,
                  "mixed_precision": "no"}})
    cfg.validate()
    plan = train_dpo(cfg, dry_run=True)
    assert plan["data"].endswith(f"; {GEMMA_SAYS}"), plan["data"]
    train_dpo(cfg)
    tok_config = json.loads((tmp_path / "dpo" / "model" / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<end_of_turn>"
