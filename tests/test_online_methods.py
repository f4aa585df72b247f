"""Every online method through the one RL loop (align/ppo.py): each runs and writes the same run
directory and metric names as PPO; the first step has KL 0 and ratio 1 wherever the KL goes; every
loss aggregation gives the same update whatever the micro-batch split; dynamic sampling drops
exactly the zero-variance groups; GRPO and RLOO resume step-exactly; bad configs fail before loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from align.config import ConfigError, build_config
from align.rundir import RunDir, read_metrics
from align.stages import get_stage, rl_stages

TEMPLATE = "Q: {prompt}\nA: "
METHODS = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "remax"]


@pytest.fixture(scope="module")
def sft_model(tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.config import SFTConfig
    from align.sft import train_sft

    out = tmp_path_factory.mktemp("online-sft") / "sft"
    train_sft(build_config(SFTConfig, {
        "output_dir": str(out), "seed": 0, "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(addition_data["sft_train"]), "val_fraction": 0.0, "prompt_template": TEMPLATE,
                 "max_length": 24},
        "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "mixed_precision": "no", "log_every": 10}}))
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("online-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(8) for b in range(8)))
    return path


def config(stage: str, out: Path, sft: Path, prompts: Path, **overrides: Any) -> Any:
    data: dict[str, Any] = {
        "output_dir": str(out), "seed": 0, "model": {"path": str(sft)},
        "reward": {"function": "toy_rewards:char_sum_mod"},
        "data": {"train": str(prompts), "prompt_template": TEMPLATE, "max_length": 16},
        "eval": {"prompts": str(prompts), "max_samples": 8},
        "ppo": {"total_episodes": 48, "rollout_batch_size": 16, "n_samples_per_prompt": 4, "mini_batch_size": 8,
                "micro_batch_size": 4, "ppo_epochs": 2, "response_length": 5, "temperature": 1.0, "lr": 1e-3,
                "mixed_precision": "no", "eval_every": 2, "sample_every": 1000, "save_every": 1000},
    }
    if stage in ("ppo", "reinforce_pp", "remax"):
        data["ppo"]["n_samples_per_prompt"] = 1
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return build_config(get_stage(stage).config, data)


def test_every_estimator_has_a_stage_and_the_config_knows_them() -> None:
    from align.config import ESTIMATOR_NAMES
    from align.rl import ESTIMATORS

    assert set(ESTIMATOR_NAMES) == set(ESTIMATORS)
    by_estimator = {get_stage(s.name).config().ppo.estimator: s.name for s in rl_stages()}
    assert by_estimator == {"gae": "ppo", "grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo",
                            "reinforce_pp": "reinforce_pp", "remax": "remax"}


@pytest.mark.parametrize("stage", METHODS)
def test_each_method_writes_the_run_dir_and_metrics_of_ppo(stage: str, sft_model: Path, prompts_file: Path,
                                                           tmp_path: Path) -> None:
    from align.evaluate import evaluate_models
    from align.config import EvalConfig
    from align.ppo import train_ppo

    summary = train_ppo(config(stage, tmp_path / stage, sft_model, prompts_file))
    run = RunDir(tmp_path / stage)
    assert run.is_complete() and (run.model / "model.safetensors").is_file()
    assert not (run.root / "checkpoints").exists() or not any((run.root / "checkpoints").glob("*/critic"))
    rows = read_metrics(run.metrics)
    train_rows = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward",
                "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "val/ratio", "val/num_eos_tokens", "response_length", "lr", "episode", "episodes_per_sec",
                "tokens_per_sec", "peak_memory_mb"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["episode"] == 48
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]  # from the SFT point on, with the compute spent
    assert evals[0]["episode"] == 0 and evals[-1]["episode"] == 48
    assert summary["estimator"] == get_stage(stage).config().ppo.estimator and summary["episodes"] == 48
    ecfg = build_config(EvalConfig, {"output_dir": str(tmp_path / "eval"), "models": [str(run.root)],
                                     "prompts": str(prompts_file), "prompt_template": TEMPLATE, "response_length": 4,
                                     "max_samples": 4})
    compute = evaluate_models(ecfg)["models"][0]["compute"]
    assert compute["episodes"] == 48 and compute["stages"] == ["sft", stage]


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_first_step_has_zero_kl_and_ratio_one_wherever_the_kl_goes(placement: str, sft_model: Path,
                                                                   prompts_file: Path, tmp_path: Path) -> None:
    from align.ppo import train_ppo

    cfg = config("grpo", tmp_path / "run", sft_model, prompts_file, **{
        "ppo.kl_placement": placement, "ppo.kl_coef": 0.5, "ppo.total_episodes": 16, "ppo.ppo_epochs": 1,
        "ppo.mini_batch_size": 16, "ppo.micro_batch_size": 4})
    train_ppo(cfg)
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "objective/kl" in r][0]
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["val/ratio"] == pytest.approx(1.0, abs=1e-6) and row["policy/clipfrac_avg"] == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_is_the_same_update_whatever_the_micro_batch_split(
        mode: str, sft_model: Path, prompts_file: Path, tmp_path: Path, load_weights: Any) -> None:
    from align.ppo import train_ppo

    weights = []
    for micro in (8, 2):
        out = tmp_path / f"micro-{micro}"
        train_ppo(config("dr_grpo", out, sft_model, prompts_file, **{
            "ppo.loss_agg": mode, "ppo.total_episodes": 32, "ppo.micro_batch_size": micro, "ppo.eval_every": 100,
            "ppo.kl_coef": 0.1}))
        weights.append(load_weights(out / "model"))
    init = load_weights(sft_model / "model")
    assert max((weights[0][k] - init[k]).abs().max().item() for k in init) > 1e-4, "training changed nothing"
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=2e-6)


def test_dynamic_sampling_drops_exactly_the_groups_whose_reward_is_constant(sft_model: Path, prompts_file: Path,
                                                                            tmp_path: Path) -> None:
    """The reward is constant for prompts whose first digit is below 4 and varies otherwise: the
    first round drops exactly those groups of the first prompt batch (which the seed fixes)."""
    from align import data as D
    from align.modeling import load_tokenizer
    from align.ppo import train_ppo

    cfg = config("grpo", tmp_path / "run", sft_model, prompts_file, **{
        "reward.function": "toy_rewards:constant_below_four", "reward.missing_eos_penalty": None,
        "ppo.dynamic_sampling": True,
        "ppo.max_sampling_rounds": 1, "ppo.total_episodes": 16, "ppo.eval_every": 100})
    train_ppo(cfg)
    prompts, _ = D.load_prompts(str(prompts_file), "auto", TEMPLATE, load_tokenizer(str(sft_model)), 16, "drop")
    first = next(D.global_batches(len(prompts), 4, 0))[2]
    constant = sum(int(prompts[i].text[0]) < 4 for i in first)
    assert 0 < constant < 4  # the seed's first batch holds both kinds (else the test proves nothing)
    row = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/dropped_groups" in r][0]
    assert row["rollout/dropped_groups"] == constant
    assert row["rollout/topped_up_groups"] == constant  # one round only: the batch is filled back up


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_resume_is_step_exact(stage: str, sft_model: Path, prompts_file: Path, tmp_path: Path,
                              cut_after_step_2: Callable[[Path, Path], Path]) -> None:
    from align.ppo import train_ppo

    over = {"ppo.total_episodes": 64, "ppo.save_every": 2, "ppo.eval_every": 100}
    train_ppo(config(stage, tmp_path / "full", sft_model, prompts_file, **over))
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = cut_after_step_2(tmp_path / "full", tmp_path / "cut")
    train_ppo(config(stage, cut, sft_model, prompts_file, **over), resume=True)
    resumed = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(reference, resumed):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "policy/advantages_mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("overrides, message", [
    ({"ppo.n_samples_per_prompt": 1}, "config key 'ppo.n_samples_per_prompt' must be >= 2 for estimator 'grpo'"),
    ({"ppo.rollout_batch_size": 18}, "config key 'ppo.rollout_batch_size' must be a multiple of "
                                     "ppo.n_samples_per_prompt (4)"),
    ({"critic.lora": True}, "config section 'critic' applies to estimator gae only"),
    ({"ppo.clip_c": 0.5}, "config key 'ppo.clip_c' must be > 1"),
    ({"ppo.loss_agg": "sum"}, "config key 'ppo.loss_agg' must be one of"),
])
def test_bad_method_configs_are_one_line_errors_before_loading(overrides: dict[str, Any], message: str,
                                                               sft_model: Path, prompts_file: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config("grpo", tmp_path / "run", sft_model, prompts_file, **overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_dynamic_sampling_needs_a_group_estimator(sft_model: Path, prompts_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ppo.dynamic_sampling"):
        config("reinforce_pp", tmp_path / "run", sft_model, prompts_file, **{"ppo.dynamic_sampling": True})


def test_ppo_with_a_value_head_on_the_actor_trains_and_resumes_exactly(
        sft_model: Path, prompts_file: Path, tmp_path: Path, cut_after_step_2: Callable[[Path, Path], Path]) -> None:
    """`critic.share_actor`: no second backbone (no critic/ in the checkpoint), a value loss that
    moves, one forward per micro-batch for log-probs and values, and a step-exact resume (the
    head's weights and its optimizer travel in trainer_state.pt)."""
    from align.ppo import train_ppo

    over = {"critic.share_actor": True, "ppo.total_episodes": 64, "ppo.save_every": 2, "ppo.eval_every": 100}
    train_ppo(config("ppo", tmp_path / "full", sft_model, prompts_file, **over))
    assert not list((tmp_path / "full" / "checkpoints").glob("*/critic"))
    state = torch.load(next((tmp_path / "full" / "checkpoints").glob("step-*")) / "trainer_state.pt",
                       weights_only=False)
    assert {"value_head", "critic_opt", "critic_sched"} <= set(state)
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    losses = [r["loss/value_avg"] for r in reference if "loss/value_avg" in r]
    assert len(losses) == 4 and all(v > 0 for v in losses) and losses[-1] != losses[0]
    cut = cut_after_step_2(tmp_path / "full", tmp_path / "cut")
    train_ppo(config("ppo", cut, sft_model, prompts_file, **over), resume=True)
    for a, b in zip(reference, read_metrics(cut / "metrics.jsonl")):
        for key in ("objective/scores", "loss/value_avg", "loss/policy_avg"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_a_value_head_forward_is_the_only_forward_per_micro_batch(sft_model: Path, prompts_file: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.bundle import ModelBundle
    from align.ppo import train_ppo

    calls = {"values": 0, "shared": 0}
    values, shared = ModelBundle.values, ModelBundle.policy_logprobs_and_values

    def count_values(self, *a):
        calls["values"] += 1
        return values(self, *a)

    def count_shared(self, *a):
        calls["shared"] += 1
        return shared(self, *a)

    monkeypatch.setattr(ModelBundle, "values", count_values)
    monkeypatch.setattr(ModelBundle, "policy_logprobs_and_values", count_shared)
    train_ppo(config("ppo", tmp_path / "run", sft_model, prompts_file, **{
        "critic.share_actor": True, "ppo.total_episodes": 16, "ppo.ppo_epochs": 1, "ppo.mini_batch_size": 16,
        "ppo.micro_batch_size": 16, "ppo.eval_every": 100}))
    assert calls == {"values": 0, "shared": 1}  # fused: the update's one forward gives old log-probs and values


def test_share_actor_with_a_critic_free_method_is_a_config_error(sft_model: Path, prompts_file: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'critic.share_actor' needs a critic, and estimator 'grpo'"):
        config("grpo", tmp_path / "run", sft_model, prompts_file, **{"critic.share_actor": True})
