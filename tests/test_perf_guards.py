"""Correctness guards for the performance work (docs/performance.md): every optimised path gives
the same batches, losses, log-probs and updates, to float tolerance, as the straightforward one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from align import data as D
from align.ops import IGNORE_INDEX, entropy_from_logits, masked_mean, selective_log_softmax
from align.runtime import make_optimizer

# ----------------------------------------------------------------------------------------------
# Batching


def _bench_refs() -> Any:
    """bench/refs.py: the straightforward versions `bench/micro.py` times, checked here as they are."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_refs", Path(__file__).resolve().parents[1] / "bench" / "refs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pad_examples_reference = _bench_refs().pad_examples_reference


def random_examples(n: int, seed: int, vocab: int = 50, lo: int = 3, hi: int = 20) -> list[D.Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        prompt = int(torch.randint(1, length, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(D.Example(ids, [0] * prompt + [1] * (length - prompt)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pad_examples_builds_the_reference_batch(seed: int) -> None:
    examples = random_examples(9, seed)
    got, want = D.pad_examples(examples, pad_id=0), pad_examples_reference(examples, pad_id=0)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_examples_keeps_every_token_and_label(seed: int) -> None:
    examples = random_examples(13, seed)
    packed = D.pack_examples(examples, pad_id=0)
    padded = D.pad_examples(examples, pad_id=0)
    real = packed["token_mask"].bool()
    assert int(real.sum()) == int(padded["attention_mask"].sum())
    assert sorted(packed["input_ids"][real].tolist()) == sorted(padded["input_ids"][padded["attention_mask"].bool()].tolist())
    # The same supervised tokens: the item count the loss is divided by is unchanged.
    count = lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum())  # noqa: E731
    assert count(packed) == count(padded)
    # Fewer computed slots than padding every example to the longest.
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_free_sft_terms_equal_padded(tiny_llama: Any, seed: int) -> None:
    """Same summed NLL, token count, token accuracy and gradient from a packed batch as a padded one."""
    from align.sft import sft_terms

    examples = random_examples(11, seed)
    results = []
    for batch in (D.pad_examples(examples, 0), D.pack_examples(examples, 0)):
        tiny_llama.zero_grad()
        nll, n, stats = sft_terms(tiny_llama, batch)
        nll.backward()
        grads = [p.grad.clone() for p in tiny_llama.parameters()]
        results.append((nll.detach(), n, stats["token_accuracy"], grads))
    (a_nll, a_n, a_acc, a_g), (b_nll, b_n, b_acc, b_g) = results
    assert int(a_n) == int(b_n)
    assert int(a_acc) == int(b_acc)
    torch.testing.assert_close(a_nll, b_nll, rtol=1e-5, atol=1e-4)
    for ga, gb in zip(a_g, b_g):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Optimizer


def test_fused_adamw_matches_the_per_tensor_loop() -> None:
    """make_optimizer's fused AdamW makes the same updates as the default per-tensor AdamW."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    fused = make_optimizer(model.parameters(), 1e-2, 0.1, [0.9, 0.999])
    assert fused.defaults.get("fused")
    decay = [p for p in twin.parameters() if p.ndim >= 2]
    plain = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.999), foreach=False, fused=False)
    for step in range(5):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy


def selective_log_softmax_reference(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("shape", [(8, 16, 260), (2, 4, 2**20 + 3)])  # vectorised path, row-loop path
def test_selective_log_softmax_paths_match_log_softmax(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 3
    index = torch.randint(0, shape[-1], shape[:2])
    # float32 sums over a million logits differ in the last bits with the summation order
    torch.testing.assert_close(selective_log_softmax(logits, index), selective_log_softmax_reference(logits, index),
                               rtol=1e-4, atol=1e-3)


def test_selective_log_softmax_gradient_matches() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 50, requires_grad=True)
    index = torch.randint(0, 50, (4, 6))
    (g1,) = torch.autograd.grad(selective_log_softmax(logits, index).sum(), logits)
    (g2,) = torch.autograd.grad(selective_log_softmax_reference(logits, index).sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_entropy_without_bonus_leaves_the_gradient_unchanged() -> None:
    """With ent_coef 0 the PPO loss takes the entropy under no_grad: the same loss and gradient
    as keeping it in the graph and multiplying it by 0."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 30, requires_grad=True)
    mask = (torch.rand(4, 6) > 0.3).float()
    base = (logits.log_softmax(-1)[..., 0] * mask).sum()
    with_graph = base - 0.0 * masked_mean(entropy_from_logits(logits), mask)
    with torch.no_grad():
        logged = masked_mean(entropy_from_logits(logits), mask)
    without = base - 0.0 * logged
    (g1,) = torch.autograd.grad(with_graph, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(without, logits)
    torch.testing.assert_close(with_graph, without)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------------------------
# End to end: a padding-free SFT run logs the same losses as a padded one


@pytest.mark.slow
def test_padding_free_sft_run_matches_padded(make_sft_config: Any, tmp_path: Path) -> None:
    from align.rundir import read_metrics
    from align.sft import train_sft

    losses = []
    for free in (False, True):
        cfg = make_sft_config(tmp_path / f"run-{free}", {"train.padding_free": free, "train.max_steps": 3,
                                                         "train.eval_every": 3})
        train_sft(cfg)
        rows = read_metrics(tmp_path / f"run-{free}" / "metrics.jsonl")
        losses.append([r["train/loss"] for r in rows if "train/loss" in r] + [r["val/loss"] for r in rows if "val/loss" in r])
    assert len(losses[0]) == 4
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# PPO scoring: only the response positions go through the output head


@pytest.mark.parametrize("lora", [False, True])
def test_response_logits_with_logits_to_keep_match_full_logits(tiny_llama: Any, lora: bool) -> None:
    from align.bundle import _keeps_logits, response_logits
    from align.reward import position_ids

    model = tiny_llama
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      task_type="CAUSAL_LM"))
    assert _keeps_logits(model)
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, :3] = 0  # left-padded prompt
    mask[1, :1] = 0
    mask[2, -2:] = 0  # right-padded response
    prompt_width = 5
    got = response_logits(model, ids, mask, prompt_width, temperature=0.7)
    full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    want = full[:, prompt_width - 1:-1].float() / 0.7
    assert got.shape == (4, 12 - prompt_width, 50)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_free_is_refused_where_batches_stay_padded() -> None:
    from align.config import RMConfig, SFTConfig, from_dict
    from align.errors import ConfigError

    base = {"output_dir": "x", "model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"padding_free": True}}
    from_dict(SFTConfig, base).validate()
    with pytest.raises(ConfigError, match="train.padding_free"):
        from_dict(RMConfig, base).validate()


# ----------------------------------------------------------------------------------------------
# Padding-free by default: a probe on the loaded model decides, so no architecture that attends
# across packed examples is ever packed


@pytest.fixture(scope="module")
def tiny_opt_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OPT model (its attention ignores restarting position ids) with the suite's tokenizer."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("opt")
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_packs_exactly_tells_apart_models_that_attend_across_examples(tiny_llama: Any, tiny_opt_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from align.modeling import packs_exactly

    tiny_llama.train()
    assert packs_exactly(tiny_llama)
    assert tiny_llama.training  # the probe restores the mode it found
    assert not packs_exactly(AutoModelForCausalLM.from_pretrained(tiny_opt_dir))


def test_sft_packs_by_default_only_where_the_probe_passes(make_sft_config: Any, tiny_opt_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from align.errors import AlignError
    from align.sft import train_sft

    over = {"train.max_steps": 2, "train.warmup_steps": 0, "train.eval_every": 2}
    train_sft(make_sft_config(tmp_path / "llama", over))
    assert "batches: packed (padding-free)" in capsys.readouterr().out
    train_sft(make_sft_config(tmp_path / "opt", {**over, "model.path": str(tiny_opt_dir)}))
    assert "batches: padded (this model attends across packed examples)" in capsys.readouterr().out
    with pytest.raises(AlignError, match="train.padding_free.*attends across examples"):
        train_sft(make_sft_config(tmp_path / "opt-forced", {**over, "model.path": str(tiny_opt_dir),
                                                            "train.padding_free": True}))
    assert not (tmp_path / "opt-forced" / "model").exists()
