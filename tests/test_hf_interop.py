"""Interop with the Hugging Face ecosystem: what a checkpoint's own files may not change in align
(its generation_config.json), and what align writes that other loaders must read (pad tokens,
LoRA adapters with grown embeddings, adapters whose run directory moved, chat prompts)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.config import LoraConfig, ModelConfig
from align.generation import sample
from align.modeling import apply_lora, inspect_model, load_pretrained, load_tokenizer, load_trainable, save_model

LORA = LoraConfig(enabled=True, r=4, alpha=8, target="all")


@contextmanager
def cwd(path: Path) -> Iterator[None]:
    """Plain peft/transformers resolve a relative base path against the working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load(path: Path, trainable: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(path), padding_side="left")
    return tokenizer, load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(path)), tokenizer, trainable=trainable)


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------------------------
# 1. The model's generation_config.json does not leak into sampling

POLLUTED = {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "top_k": 1, "top_p": 0.1, "typical_p": 0.2,
            "min_p": 0.5, "min_length": 30, "min_new_tokens": 10, "temperature": 0.3, "do_sample": True,
            "max_new_tokens": 2, "bad_words_ids": [[20], [21]], "suppress_tokens": [22, 23],
            "begin_suppress_tokens": [24], "epsilon_cutoff": 0.01, "eos_token_id": 2, "pad_token_id": 0,
            "bos_token_id": 1}
"""A generation config that changes every decoding step if it applies."""


@pytest.fixture(scope="module")
def polluted_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights and tokenizer with a generation_config.json full of decoding settings."""
    path = tmp_path_factory.mktemp("polluted") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "generation_config.json").write_text(json.dumps(POLLUTED))
    return path


PROMPTS = [[20, 11, 21, 29], [22, 11, 23, 29, 24], [25]]
PROMPT_TEXTS = ["1(2:", "3(4:5", "6"]
"""PROMPTS as text: prompts whose greedy continuations repeat tokens, so the penalties would bite."""


def test_greedy_sampling_ignores_the_models_generation_config(tiny_model_dir: Path, polluted_dir: Path) -> None:
    from transformers import GenerationConfig

    tok, clean = load(tiny_model_dir)
    _, polluted = load(polluted_dir)
    assert polluted.generation_config.repetition_penalty == 5.0  # the file was read
    want = sample(clean, tok, PROMPTS, 12, greedy=True)
    got = sample(polluted, tok, PROMPTS, 12, greedy=True)
    assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask)
    assert polluted.generation_config.repetition_penalty == 5.0  # restored after the call

    # Passing align's settings as a GenerationConfig alone is not enough: the file still bites.
    settings = GenerationConfig(do_sample=False, max_new_tokens=12, min_new_tokens=0, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    inputs = {"input_ids": want.prompt_ids, "attention_mask": want.prompt_mask, "generation_config": settings}
    assert not torch.equal(polluted.generate(**inputs), clean.generate(**inputs))

    # Through a peft model too (it generates with its base model's generation config).
    torch.manual_seed(0)
    clean_lora = apply_lora(clean, LORA)
    torch.manual_seed(0)
    polluted_lora = apply_lora(polluted, LORA)
    assert torch.equal(sample(polluted_lora, tok, PROMPTS, 12, greedy=True).response_ids,
                       sample(clean_lora, tok, PROMPTS, 12, greedy=True).response_ids)


def test_temperature_sampling_ignores_the_models_generation_config(tiny_model_dir: Path, polluted_dir: Path) -> None:
    tok, clean = load(tiny_model_dir)
    _, polluted = load(polluted_dir)
    for seed in range(3):
        torch.manual_seed(seed)
        want = sample(clean, tok, PROMPTS * 4, 10, temperature=1.0)
        torch.manual_seed(seed)
        got = sample(polluted, tok, PROMPTS * 4, 10, temperature=1.0)
        assert torch.equal(got.response_ids, want.response_ids), f"seed {seed}"
        assert torch.equal(got.response_mask, want.response_mask)


@pytest.mark.parametrize("extra", [[], ["--temperature", "1.0", "--seed", "3"]])
def test_generate_cli_ignores_the_models_generation_config(tiny_model_dir: Path, polluted_dir: Path, extra: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import align.generation

    real_sample = align.generation.sample

    def run(path: Path) -> tuple[str, list[list[int]]]:
        rollouts = []
        monkeypatch.setattr(align.generation, "sample", lambda *a, **k: rollouts.append(real_sample(*a, **k)) or
                            rollouts[-1])
        prompts = [arg for text in PROMPT_TEXTS for arg in ("--prompt", text)]
        result = CliRunner().invoke(main, ["generate", str(path), *prompts, "--max-new-tokens", "12", *extra])
        assert result.exit_code == 0, result.output
        # Compared as ids too: the random model's bytes often decode to the same U+FFFD characters.
        return result.stdout, rollouts[0].response_ids.tolist()

    clean = run(tiny_model_dir)
    assert extra or any(len(set(row)) < len(row) for row in clean[1])  # no_repeat_ngram_size=1 would bite
    assert run(polluted_dir) == clean


# ----------------------------------------------------------------------------------------------
# 2. Pad tokens: reuse an unused token; when one must be added, the LoRA adapter carries the growth


def tiny_base(path: Path, specials: list[str], chat_template: str | None = None, **tokens: str) -> Path:
    """A tiny Llama and a byte-level tokenizer whose only special tokens are `specials` (no pad
    unless `tokens` names one), saved with save_pretrained like a downloaded checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["abc"], trainers.BpeTrainer(
        vocab_size=256 + len(specials), special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **{"bos_token": "<s>", "eos_token": "</s>", **tokens})
    tok.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("specials, tokens, template, expected", [
    (["<s>", "</s>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"], {}, None,
     "<|reserved_special_token_0|>"),  # Llama-3
    (["<s>", "</s>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"], {}, None,
     "<|finetune_right_pad_id|>"),  # Llama-3.1: the dedicated pad placeholder wins
    (["<s>", "</s>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"], {"pad_token": "</s>"}, None,
     "<|reserved_special_token_0|>"),  # pad == EOS is replaced
    (["<s>", "</s>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"], {},
     "{{ '<|reserved_special_token_0|>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
     "<|reserved_special_token_1|>"),  # a token the chat template uses is not unused
    (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"bos_token": None, "eos_token": "<|im_end|>"}, None,
     "<|endoftext|>"),  # Qwen instruct
    (["<unk>", "<s>", "</s>"], {"unk_token": "<unk>"}, None, "<unk>"),  # Llama-2 / Mistral
])
def test_an_unused_token_becomes_the_pad_token(tmp_path: Path, specials: list[str], tokens: dict[str, Any],
                                               template: str | None, expected: str) -> None:
    from transformers import AutoTokenizer

    base = tiny_base(tmp_path / "base", specials, template, **tokens)
    original = AutoTokenizer.from_pretrained(base)
    tok = load_tokenizer(str(base))
    assert tok.pad_token == expected
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(original)  # the vocabulary did not grow
    _, model = load(base)
    assert model.get_input_embeddings().num_embeddings == len(original)
    tok.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").pad_token == expected


def trained_adapter(base: Path, out_dir: Path, standalone: bool = True) -> tuple[Any, Any]:
    """`apply_lora` on the base as align loads it, with nonzero LoRA B matrices (an adapter that
    changes the model), saved with `save_model` to out_dir (`standalone`: as a final model, else
    as a checkpoint)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(base))
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(base)), tokenizer, trainable=True)
    model = apply_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    save_model(model, tokenizer, out_dir, standalone=standalone)
    return tokenizer, model


def test_reused_pad_token_keeps_the_adapter_small_and_loadable_by_transformers(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / "base", ["<s>", "</s>", "<|reserved_special_token_0|>"])
    tokenizer, model = trained_adapter(base, tmp_path / "adapter")
    assert all("lora_" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    ids = torch.tensor([[tokenizer.bos_token_id, 70, 71, 72, tokenizer.pad_token_id]])
    want = logits(model, ids)
    with cwd(tmp_path / "adapter"):
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(logits(plain, ids), want, atol=1e-5)


def test_grown_vocabulary_adapter_loads_with_every_loader(tmp_path: Path) -> None:
    """No reusable token: align adds one and grows the embeddings. transformers never grows a base
    it loads for an adapter, so a final model/ holds the grown base in model/base/, which the
    adapter names: plain `AutoModelForCausalLM.from_pretrained(adapter)`, `AutoPeftModelForCausalLM`,
    peft on the grown base and align all load it, and the adapter itself stays LoRA-only."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from align.modeling import GROWN_BASE_DIR

    base = tiny_base(tmp_path / "base", ["<s>", "</s>"])
    adapter = tmp_path / "adapter"
    tokenizer, model = trained_adapter(base, adapter)
    vocab = len(AutoTokenizer.from_pretrained(base))
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == vocab + 1
    assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
    grown = adapter / GROWN_BASE_DIR
    assert AutoConfig.from_pretrained(grown).vocab_size == vocab + 1
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(grown.resolve())
    assert len(AutoTokenizer.from_pretrained(adapter)) == vocab + 1

    ids = torch.tensor([[tokenizer.bos_token_id, 70, 71, 72, tokenizer.pad_token_id]])
    want = logits(model, ids)
    assert want.shape[-1] == vocab + 1

    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(adapter), ids), want, atol=1e-5)
    with cwd(adapter):
        auto_peft = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert torch.allclose(logits(auto_peft, ids), want, atol=1e-5)
    on_grown = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(grown), adapter)
    assert torch.allclose(logits(on_grown, ids), want, atol=1e-5)
    _, by_align = load(adapter)
    assert torch.allclose(logits(by_align, ids), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. Adapters load after the run directory moves


def test_adapter_loads_after_its_directory_tree_moves(tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    root = tmp_path / "project"
    base = tiny_base(root / "models" / "base", ["<s>", "</s>"])  # a grown vocabulary: the hardest case
    adapter = root / "runs" / "sft" / "checkpoints" / "step-1" / "actor"  # a checkpoint: the base stays outside
    tokenizer, model = trained_adapter(base, adapter, standalone=False)
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base.resolve())  # what plain peft and transformers read: loads from any directory
    assert json.loads((adapter / "align_base.json").read_text()) == {
        "relative": os.path.join("..", "..", "..", "..", "..", "models", "base")}
    ids = torch.tensor([[tokenizer.bos_token_id, 70, 71, 72, tokenizer.pad_token_id]])
    want = logits(model, ids)
    assert torch.allclose(logits(AutoPeftModelForCausalLM.from_pretrained(adapter), ids), want, atol=1e-5)

    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(root, moved)
    assert not root.exists()
    adapter = moved / "runs" / "sft" / "checkpoints" / "step-1" / "actor"

    # align resolves the base against the adapter directory, from any working directory
    assert inspect_model(str(adapter), "model.path").vocab_size == len(tokenizer) - 1
    _, by_align = load(adapter)
    assert torch.allclose(logits(by_align, ids), want, atol=1e-5)
    result = CliRunner().invoke(main, ["generate", str(adapter), "--prompt", "ab", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


    # Resuming from a checkpoint at another depth and saving again records the base afresh.
    resumed = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(moved / "models" / "base")), LORA,
                             load_tokenizer(str(adapter)), torch.device("cpu"), resume_from=adapter)
    again = moved / "runs" / "ppo" / "checkpoints" / "step-1" / "actor" / "deeper"
    save_model(resumed, load_tokenizer(str(adapter)), again, standalone=False)
    assert json.loads((again / "align_base.json").read_text())["relative"] == \
        os.path.join("..", "..", "..", "..", "..", "..", "models", "base")
    assert json.loads((again / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((moved / "models" / "base").resolve())
    _, reloaded = load(again)
    assert torch.allclose(logits(reloaded, ids), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. `align generate --chat`

SIMPLE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")


def spy_on_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import align.generation

    seen: list[str] = []
    real_sample = align.generation.sample

    def spy(model: Any, tokenizer: Any, prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        seen.extend(tokenizer.decode(p) for p in prompts)
        return real_sample(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(align.generation, "sample", spy)
    return seen


def with_chat_template(tiny_model_dir: Path, path: Path, template: str | None) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink()
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def test_generate_chat_applies_the_chat_template(tiny_model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = with_chat_template(tiny_model_dir, tmp_path / "chat", SIMPLE_TEMPLATE)
    seen = spy_on_prompts(monkeypatch)
    result = CliRunner().invoke(main, ["generate", str(model), "--chat", "--prompt", "1+2=", "--prompt", "hi",
                                       "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert seen == ["[user] 1+2=\n[assistant] ", "[user] hi\n[assistant] "]
    assert "--- 1+2=" in result.stdout and "--- hi" in result.stdout


def test_generate_chat_without_a_chat_template_is_a_one_line_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = with_chat_template(tiny_model_dir, tmp_path / "plain", None)
    result = CliRunner().invoke(main, ["generate", str(model), "--chat", "--prompt", "1+2="])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --chat: the tokenizer of '{model}' has no chat template"
    result = CliRunner().invoke(main, ["generate", str(tiny_model_dir), "--chat", "--template", "{prompt}",
                                       "--prompt", "1+2="])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
