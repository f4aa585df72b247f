"""Stages that start from a LoRA run: the model they train starts as base + that run's adapter.

The usual LoRA workflow chains adapters: SFT with LoRA, then PPO (actor with a new LoRA, critic
from the SFT model) or a reward model from the SFT run. peft names every new adapter "default",
so an SFT adapter attached (not merged) to the loaded model was silently replaced by the new,
zero-initialised one: PPO trained from the base model, not from SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from align.config import LoraConfig, ModelConfig
from align.modeling import load_score_model, load_tokenizer, load_trainable, save_model

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])
MASK = torch.ones_like(IDS)
LORA = LoraConfig(enabled=True, r=4, alpha=8)


def _perturb_adapter(model: torch.nn.Module, seed: int) -> None:
    """A trained-looking adapter: lora_B is zero at initialisation (the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def lora_sft(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA SFT run's model/ (an adapter directory) and its logits on IDS."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)), LORA, tok, CPU)
    _perturb_adapter(model, 0)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    out = tmp_path_factory.mktemp("lora-sft") / "model"
    save_model(model, tok, out)
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    return out, logits


def _tok(path: Path) -> Any:
    return load_tokenizer(str(path))


def test_a_new_lora_on_a_lora_run_starts_from_that_run(lora_sft: tuple[Path, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    path, sft_logits = lora_sft
    actor = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(path)), LORA, _tok(path), CPU)
    trained = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    actor.eval()
    with torch.no_grad():
        logits = actor(input_ids=IDS).logits
    torch.testing.assert_close(logits, sft_logits, atol=1e-5, rtol=0)


def test_full_training_from_a_lora_run_trains_every_weight(lora_sft: tuple[Path, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    path, sft_logits = lora_sft
    model = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(path)), LoraConfig(), _tok(path), CPU)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora_" in n for n in names), "the SFT adapter is merged, not attached"
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, sft_logits, atol=1e-5, rtol=0)


def test_a_critic_from_a_lora_sft_run_has_the_sft_backbone(lora_sft: tuple[Path, torch.Tensor],
                                                          tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = lora_sft
    tok = _tok(path)
    critic = load_score_model(ModelConfig(path=str(path)), LoraConfig(), tok, CPU)
    assert any(p.requires_grad for p in critic.parameters())
    sft = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(path)), LoraConfig(), tok, CPU)
    base = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)), LoraConfig(), tok, CPU)
    name = "layers.0.self_attn.q_proj.weight"
    weights = {n: p for n, p in critic.model.named_parameters() if n.endswith(name)}
    (critic_q,) = weights.values()
    sft_q = dict(sft.named_parameters())["model." + name]
    torch.testing.assert_close(critic_q, sft_q, atol=0, rtol=0)
    assert not torch.equal(sft_q, dict(base.named_parameters())["model." + name])


def test_a_lora_reward_model_keeps_its_trained_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = _tok(tiny_model_dir)
    rm = load_score_model(ModelConfig(path=str(tiny_model_dir)), LORA, tok, CPU)
    _perturb_adapter(rm, 1)
    rm.eval()
    with torch.no_grad():
        before = rm(IDS, MASK)
    save_model(rm, tok, tmp_path / "rm")
    again = load_score_model(ModelConfig(path=str(tmp_path / "rm")), LoraConfig(), tok, CPU)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS, MASK), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merging_gathered_weights_is_merge_and_unload(arch: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`merged_lora_weights` (how a sharded run merges its LoRA model: from the full state dict
    every process gathered) gives what peft's own `merge_and_unload` gives, for a causal LM and a
    reward model (trained head in modules_to_save) and for GPT-2's fan-in-fan-out Conv1D layers."""
    from architectures import build_tiny
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.modeling import merged_lora_weights

    path = tiny_model_dir if arch == "llama" else build_tiny("gpt2", tmp_path / "gpt2")
    tokenizer = load_tokenizer(str(path))
    lora = LoraConfig(enabled=True, r=4, alpha=8, target="all")
    for auto_cls, kwargs in ((AutoModelForCausalLM, {}), (AutoModelForSequenceClassification,
                                                          {"task_type": "SEQ_CLS", "num_labels": 1, "new_head_ok": True})):
        model = load_trainable(auto_cls, ModelConfig(path=str(path)), lora, tokenizer, CPU, None, **kwargs)
        _perturb_adapter(model, seed=1)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        got = merged_lora_weights(model, state)
        expected = model.merge_and_unload().state_dict()
        assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
        unmerged = {k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", "."): v
                    for k, v in state.items() if ".modules_to_save." not in k}
        changed = 0
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
            changed += not torch.equal(v, unmerged[k])
        assert changed > 0, "the adapter changed no weight: the test would pass for any merge"
