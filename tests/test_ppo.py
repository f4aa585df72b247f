"""PPO: the four-model bundle in both memory modes, the first-step invariants, learning, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from align.config import PPOConfig, SFTConfig, from_dict, set_dotted
from align.rundir import read_metrics

TEMPLATE = "Q: {prompt}\nA: "


@pytest.fixture(scope="module")
def sft_model(tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a few SFT steps on one-digit addition, so it answers with digits."""
    from align.sft import train_sft

    out = tmp_path_factory.mktemp("ppo-sft") / "sft"
    cfg = from_dict(SFTConfig, {
        "output_dir": str(out), "seed": 0, "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(addition_data["sft_train"]), "val_fraction": 0.0, "prompt_template": TEMPLATE,
                 "max_length": 24},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 3e-3, "mixed_precision": "no", "log_every": 10}})
    cfg.validate()
    train_sft(cfg)
    return out


@pytest.fixture(scope="module")
def prompts_file(addition_prompts: Path) -> Path:
    return addition_prompts


def ppo_config(out: Path, sft: Path, prompts: Path, **overrides: Any) -> PPOConfig:
    data: dict[str, Any] = {
        "output_dir": str(out), "seed": 0, "model": {"path": str(sft)},
        "reward": {"function": "toy_rewards:fraction_of_sevens"},
        "data": {"train": str(prompts), "prompt_template": TEMPLATE, "max_length": 16},
        "ppo": {"total_episodes": 64, "rollout_batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 4,
                "ppo_epochs": 2, "response_length": 6, "temperature": 1.0, "lr": 1e-3, "mixed_precision": "no",
                "eval_every": 1000, "sample_every": 1000, "save_every": 1000},
    }
    for key, value in overrides.items():
        set_dotted(data, key, value)
    cfg = from_dict(PPOConfig, data)
    cfg.validate()
    return cfg


def first_rollout(cfg: PPOConfig):
    """Build the bundle and sample one batch, as the first PPO step does."""
    from align import data as D
    from align.bundle import build_bundle
    from align.generation import sample
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    prompts, _ = D.load_prompts(cfg.data.train, "auto", cfg.data.prompt_template, tokenizer, 16, "drop")
    bundle = build_bundle(cfg, tokenizer, torch.device("cpu"), None)
    torch.manual_seed(0)
    rollout = sample(bundle.actor, tokenizer, [p.ids for p in prompts[:8]], 6, temperature=1.0)
    return bundle, rollout, tokenizer


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_first_step_kl_is_zero_and_ratio_is_one(mode, sft_model, prompts_file, tmp_path):
    from align.ops import masked_mean
    from align.rl import kl_estimate

    bundle, rollout, _ = first_rollout(ppo_config(tmp_path / "ppo", sft_model, prompts_file, memory_mode=mode))
    mask = rollout.response_mask.float()
    with torch.no_grad():
        old, _ = bundle.policy_logprobs(bundle.actor, rollout)
        ref = bundle.reference_logprobs(rollout, bundle.actor)
    bundle.actor.train()  # the update pass runs in train mode: dropout is off, so nothing changes
    new, _ = bundle.policy_logprobs(bundle.actor, rollout)
    for kind in ("k1", "k2", "k3"):
        assert masked_mean(kl_estimate(old, ref, kind).abs(), mask).item() < 1e-6
    ratio = torch.exp(new - old)
    assert torch.equal(ratio[mask.bool()], torch.ones_like(ratio[mask.bool()]))


def unique_storage(*models: torch.nn.Module) -> int:
    """Elements held by distinct parameter storages across `models` (shared weights count once)."""
    seen, total = set(), 0
    for model in models:
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def test_lora_mode_keeps_one_copy_of_the_base_weights(sft_model, prompts_file, tmp_path):
    from align.bundle import build_bundle
    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(sft_model))
    full = build_bundle(ppo_config(tmp_path / "a", sft_model, prompts_file), tokenizer, torch.device("cpu"), None)
    lora = build_bundle(ppo_config(tmp_path / "b", sft_model, prompts_file, memory_mode="lora"), tokenizer,
                        torch.device("cpu"), None)
    base = sum(p.numel() for p in full.actor.parameters())
    assert lora.reference is None
    adapter = sum(p.numel() for n, p in lora.actor.named_parameters() if "lora_" in n)
    assert unique_storage(lora.actor) == base + adapter  # base once, plus the adapter
    assert unique_storage(full.actor, full.reference) == 2 * base  # the full mode has two copies


def test_lora_reference_equals_a_separately_loaded_sft_model(sft_model, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.bundle import response_logits
    from align.ops import selective_log_softmax

    bundle, rollout, _ = first_rollout(ppo_config(tmp_path / "ppo", sft_model, prompts_file, memory_mode="lora"))
    with torch.no_grad():  # move the adapter away from zero, so the actor differs from the reference
        for n, p in bundle.actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        actor_lp, _ = bundle.policy_logprobs(bundle.actor, rollout)
        ref_lp = bundle.reference_logprobs(rollout, bundle.actor)
        sft = AutoModelForCausalLM.from_pretrained(sft_model / "model").eval()
        logits = response_logits(sft, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1], 1.0)
        sft_lp = selective_log_softmax(logits, rollout.response_ids)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(ref_lp[mask], sft_lp[mask], rtol=1e-5, atol=1e-5)
    assert (actor_lp[mask] - sft_lp[mask]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ppo_raises_a_simple_reward(mode, sft_model, prompts_file, tmp_path):
    """Reward = fraction of '7' in the response. An honest learning test: fixed seed, the mean
    score of the last steps must clearly exceed that of the first steps."""
    from align.ppo import train_ppo

    extra = {"lora.r": 8, "lora.alpha": 16, "ppo.lr": 1e-2} if mode == "lora" else {}
    cfg = ppo_config(tmp_path / "ppo", sft_model, prompts_file, memory_mode=mode, **{"ppo.total_episodes": 480,
                     "ppo.kl_coef": 0.01, **extra})
    summary = train_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    assert len(scores) == 30
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.15, scores
    assert all(abs(r["objective/kl"]) < 5 for r in rows)  # reported and bounded
    assert summary["steps"] == 30
    assert (tmp_path / "ppo" / "model" / ("adapter_config.json" if mode == "lora" else "config.json")).is_file()


def test_ppo_metrics_carry_trl_names(sft_model, prompts_file, tmp_path):
    from align.ppo import train_ppo

    train_ppo(ppo_config(tmp_path / "ppo", sft_model, prompts_file, **{"ppo.total_episodes": 16}))
    row = read_metrics(tmp_path / "ppo" / "metrics.jsonl")[0]
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward",
                 "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                 "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "response_length",
                 "lr", "episode", "episodes_per_sec", "tokens_per_sec", "peak_memory_mb"):
        assert name in row, name
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # first step, before any update
    samples = [json.loads(l) for l in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "score"} <= set(samples[0])


def test_ppo_resume_continues_with_the_same_kl_coefficient(sft_model, prompts_file, tmp_path):
    """An adaptive-KL run interrupted after its step-2 checkpoint and resumed logs the same metrics,
    step for step, as the uninterrupted run (CPU, same seed)."""
    from align.ppo import train_ppo

    over = {"ppo.total_episodes": 64, "ppo.save_every": 2, "ppo.kl_target": 0.5, "ppo.kl_horizon": 64}
    train_ppo(ppo_config(tmp_path / "full", sft_model, prompts_file, **over))
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    # Simulate a kill right after the step-2 checkpoint: keep only what existed then.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "model")
    (cut / "summary.json").unlink()
    ckpts = cut / "checkpoints"
    for p in ckpts.glob("step-*"):
        if p.name != "step-0000002":
            shutil.rmtree(p)
    (ckpts / "latest").write_text("step-0000002")
    state = torch.load(ckpts / "step-0000002" / "trainer_state.pt", weights_only=False)
    assert state["kl_ctl"]["value"] != pytest.approx(0.05)  # the controller has moved
    cfg = ppo_config(cut, sft_model, prompts_file, **over)
    train_ppo(cfg, resume=True)
    resumed = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    step3 = [r for r in resumed if r["step"] == 3][0]
    assert step3["objective/kl_coef"] == pytest.approx(state["kl_ctl"]["value"])
    for a, b in zip(reference, resumed):
        for key in ("objective/scores", "objective/kl", "loss/value_avg", "objective/kl_coef"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_lora_dropout_is_off_in_ppo_so_the_first_ratio_is_one(sft_model, prompts_file, tmp_path):
    """peft adds its lora_dropout layers after the weights load; PPO must switch those off too."""
    cfg = ppo_config(tmp_path / "ppo", sft_model, prompts_file, memory_mode="lora", **{"lora.dropout": 0.5})
    bundle, rollout, _ = first_rollout(cfg)
    with torch.no_grad():
        old, _ = bundle.policy_logprobs(bundle.actor, rollout)
    bundle.actor.train()
    new, _ = bundle.policy_logprobs(bundle.actor, rollout)
    mask = rollout.response_mask.bool()
    assert torch.equal(new[mask], old[mask])


def test_fp16_is_refused_for_ppo(sft_model, prompts_file, tmp_path):
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match="ppo.mixed_precision"):
        ppo_config(tmp_path / "ppo", sft_model, prompts_file, **{"ppo.mixed_precision": "fp16"})


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fused_scoring_matches_separate_scoring_passes(mode, sft_model, prompts_file, tmp_path, monkeypatch):
    """`ppo.fuse_scoring` (docs/performance.md): with one forward covering the rollout, the old
    log-probs and values come from the first update's forward. The run must log the same metrics and
    end with the same weights as the run with separate no-grad scoring passes, and must really skip
    those passes (counted)."""
    from safetensors.torch import load_file

    from align.bundle import ModelBundle
    from align.ppo import train_ppo

    calls = {"values": 0}
    original = ModelBundle.values

    def counted(self, critic, rollout):
        calls["values"] += 1
        return original(self, critic, rollout)

    monkeypatch.setattr(ModelBundle, "values", counted)
    runs, counts = {}, {}
    for fused in (False, True):
        calls["values"] = 0
        over = {"memory_mode": mode, "ppo.total_episodes": 48, "ppo.mini_batch_size": 16,
                "ppo.micro_batch_size": 16, "ppo.fuse_scoring": fused, "ppo.kl_estimator": "k3"}
        train_ppo(ppo_config(tmp_path / f"run-{fused}", sft_model, prompts_file, **over))
        runs[fused] = read_metrics(tmp_path / f"run-{fused}" / "metrics.jsonl")
        counts[fused] = calls["values"]
    assert counts == {False: 3 * (1 + 2), True: 3 * 2}  # 3 steps x (scoring pass + 2 epochs)
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[False], runs[True]):
        for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/non_score_reward",
                    "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg",
                    "val/clipfrac_avg", "val/ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    wa, wb = (load_file(str(next((tmp_path / f"run-{f}" / "model").glob("*.safetensors")))) for f in (False, True))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_evals_log_the_response_tokens_generated_so_far(sft_model, prompts_file, tmp_path):
    """The matched-compute x axis: each eval row's `tokens_generated` is the sum over the steps
    before it of (mean response length x responses per step)."""
    from align.ppo import train_ppo

    train_ppo(ppo_config(tmp_path / "ppo", sft_model, prompts_file,
                         **{"ppo.total_episodes": 48, "ppo.eval_every": 2, "ppo.log_every": 1,
                            "eval.prompts": str(prompts_file), "eval.max_samples": 4}))
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward" in r]
    train = [r for r in rows if "response_length" in r]
    assert [r["step"] for r in evals] == [0, 2, 3] and len(train) == 3
    for e in evals:
        expected = sum(r["response_length"] * 16 for r in train if r["step"] <= e["step"])
        assert e["tokens_generated"] == pytest.approx(expected, rel=1e-6), e
    assert evals[-1]["tokens_generated"] > 0
