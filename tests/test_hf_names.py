"""The names users bring: real TRL and LLaMA-Factory example configs (tests/fixtures/hf_configs/)
load into align's configs with the meaning those projects give the keys, one runs end to end,
`--print-config` shows the mapping, and a key with no counterpart is an error saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from align.cli import main
from align.config import (ConfigError, DPOStageConfig, GRPOStageConfig, RMConfig, SFTConfig, build_config,
                          config_dict)

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"


def fixture(name: str, tmp_path: Path, model: Path, data: Path) -> Path:
    text = (FIXTURES / name).read_text().replace("MODEL", str(model)).replace("DATA", str(data))
    text = text.replace("OUT", str(tmp_path / "out"))
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.tasks.addition import build

    out = tmp_path_factory.mktemp("hf-data")
    build(out, seed=0, n_digits=1, n_sft=64, n_pref=32, n_prompts=16, n_eval=4)
    return out


def load(cls: type, stage: str, path: Path):
    d, used = config_dict(cls, path, stage=stage)
    return build_config(cls, d), dict(used)


def test_trl_sft_config(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    cfg, used = load(SFTConfig, "sft", fixture("trl_sft.yaml", tmp_path, tiny_model_dir, data))
    assert cfg.model.path == str(tiny_model_dir) and cfg.data.train == str(data / "sft_train.jsonl")
    t = cfg.train
    assert (t.lr, t.epochs, t.max_steps, t.batch_size, t.grad_accum) == (2e-4, 1.0, 4, 8, 2)
    assert (t.log_every, t.eval_every, t.save_every, t.keep_checkpoints, t.warmup_ratio) == (1, 2, 100, 1, 0.25)
    assert t.warmup_for(4) == 1 and t.mixed_precision == "auto" and cfg.seed == 3
    assert t.lr_scheduler_type == "cosine" and t.report_to == []  # HF's cosine; report_to: none
    assert cfg.lora.enabled is True  # use_peft
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target) == (8, 16, "all") and cfg.data.max_length == 24
    assert used["packing"].startswith("ignored") and used["learning_rate"] == "train.lr = 0.0002"


def test_llamafactory_sft_lora_config_runs_end_to_end(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    path = fixture("llamafactory_sft_lora.yaml", tmp_path, tiny_model_dir, data)
    cfg, used = load(SFTConfig, "sft", path)
    assert cfg.lora.enabled and cfg.lora.r == 4 and cfg.lora.target == "all"
    assert cfg.data.max_length == 48 and cfg.data.max_samples == 64 and cfg.train.warmup_ratio == 0.1
    assert cfg.data.prompt_template == "Human: {prompt}\nAssistant: "
    printed = CliRunner().invoke(main, ["sft", str(path), "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert "# cutoff_len -> data.max_length = 48" in printed.stdout and "# do_train -> ignored" in printed.stdout
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["sft", str(path)])
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "out" / "model" / "adapter_config.json").is_file()


def test_trl_reward_config(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    cfg, _ = load(RMConfig, "rm", fixture("trl_reward.yaml", tmp_path, tiny_model_dir, data))
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.log_every, cfg.train.eval_every) == (8, 1e-5, 25, 50)
    assert cfg.data.max_length == 32 and cfg.data.train.endswith("pref_train.jsonl")


def test_llamafactory_dpo_config(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    cfg, _ = load(DPOStageConfig, "dpo", fixture("llamafactory_dpo.yaml", tmp_path, tiny_model_dir, data))
    assert cfg.beta == 0.1 and cfg.loss_type == "sigmoid" and not cfg.lora.enabled
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (4, 2, 5e-6)


def test_trl_grpo_config(tmp_path: Path, tiny_model_dir: Path, data: Path) -> None:
    cfg, _ = load(GRPOStageConfig, "grpo", fixture("trl_grpo.yaml", tmp_path, tiny_model_dir, data))
    p = cfg.ppo
    assert (p.estimator, p.n_samples_per_prompt, p.response_length, p.kl_coef) == ("grpo", 4, 6, 0.04)
    assert (p.clip_eps, p.clip_eps_high, p.loss_agg, p.micro_batch_size, p.lr) == (0.2, 0.28, "token-mean", 4, 1e-6)
    assert cfg.data.max_length == 16 and cfg.reward.function == "toy_rewards:fraction_of_sevens"


@pytest.mark.parametrize("extra, message", [
    ("lr_scheduler_type: reduce_lr_on_plateau\n", "config key 'lr_scheduler_type': 'reduce_lr_on_plateau' steps on "
                                                  "a metric"),
    ("lr_scheduler_type: cosine_annealing\n", "config key 'lr_scheduler_type' must be one of warmup_cosine, linear, "
                                              "cosine, cosine_with_min_lr"),
    ("report_to: comet_ml\n", "config key 'report_to': comet_ml is not available; align reports to tensorboard, "
                              "wandb, trackio, mlflow"),
    ("lr_scheduler_type: warmup_stable_decay\n", "config key 'train.lr_scheduler_kwargs' ({}) does not fit "
                                                 "train.lr_scheduler_type 'warmup_stable_decay'"),
    ("stage: dpo\n", "config key 'stage' is 'dpo', but this is `align sft`"),
    ("learning_rat: 0.1\n", "unknown config key 'learning_rat'; did you mean 'learning_rate'"),
    ("learning_rate: 0.1\ntrain: {lr: 0.2}\n", "config key 'learning_rate' maps to 'train.lr', which the file "
                                               "also sets to 0.2"),
])
def test_keys_with_no_counterpart_are_one_line_errors(extra: str, message: str, tmp_path: Path,
                                                      tiny_model_dir: Path, data: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data / 'sft_train.jsonl'}\n"
                    f"output_dir: {tmp_path / 'o'}\n{extra}")
    result = CliRunner().invoke(main, ["sft", str(path), "--dry-run"])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if "lr_scheduler_kwargs" not in message:  # the rest are found when the file is read
        with pytest.raises(ConfigError):
            load(SFTConfig, "sft", path)


@pytest.mark.parametrize("flat, expected", [
    ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
     {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": '{"power": 2.0}'},
     {"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"power": 2.0}}),
    ({"warmup_steps": 0.1}, {"warmup_ratio": 0.1}),  # transformers 5: below 1 is a fraction of the run
    ({"warmup_steps": 5}, {"warmup_steps": 5}),
    ({"report_to": "wandb"}, {"report_to": ["wandb"]}),
    ({"report_to": ["tensorboard", "mlflow"]}, {"report_to": ["tensorboard", "mlflow"]}),
    ({"report_to": "none"}, {"report_to": []}),
])
@pytest.mark.parametrize("stage, cls, section", [("sft", SFTConfig, "train"), ("dpo", DPOStageConfig, "train"),
                                                 ("grpo", GRPOStageConfig, "ppo")])
def test_schedule_and_tracker_names_keep_hf_meaning(flat: dict, expected: dict, stage: str, cls: type,
                                                    section: str, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl", "output_dir": "o", **flat}))
    d, _ = config_dict(cls, path, stage=stage)
    if stage == "grpo":
        d["reward"] = {"function": "toy_rewards:fraction_of_sevens"}
    got = getattr(build_config(cls, d), section)
    assert {k: getattr(got, k) for k in expected} == expected


def test_report_to_all_means_every_installed_tracker(tmp_path: Path) -> None:
    import importlib.util

    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: o\nreport_to: all\n")
    d, _ = config_dict(SFTConfig, path, stage="sft")
    assert d["train"]["report_to"] == [n for n in ("tensorboard", "wandb", "trackio", "mlflow")
                                       if importlib.util.find_spec(n)]
