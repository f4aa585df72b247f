"""The stage driven by a TRL trainer (DPO): a few steps on the tiny model write our metrics names, a
checkpoint, a model `align eval` reads and a summary; TRL sees our templated prompts unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align.config import DPOStageConfig, EvalConfig, from_dict
from align.rundir import RunDir, read_metrics

TEMPLATE = "Q: {prompt}\nA: "


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from align.tasks.addition import build

    return build(tmp_path_factory.mktemp("trl-data"), seed=0, n_digits=1, n_sft=20, n_pref=64, n_prompts=32,
                 n_eval=8)


def dpo_dict(out: Path, model: Path, data: dict[str, Path], **train: Any) -> dict[str, Any]:
    return {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "data": {"train": str(data["pref_train"]), "validation": str(data["pref_val"]),
                     "prompt_template": TEMPLATE, "max_length": 24},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2, "eval_every": 2,
                      "mixed_precision": "no", **train}}


def test_translate_names() -> None:
    from align.trl_stages import translate

    out = translate({"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.2, "learning_rate": 1e-3,
                     "eval_loss": 0.6, "eval_rewards/accuracies": 0.5, "eval_rewards/chosen": 0.1, "epoch": 0.5})
    assert out == {"train/loss": 0.5, "train/accuracy": 0.75, "train/margin": 0.2, "lr": 1e-3, "val/loss": 0.6,
                   "val/accuracy": 0.5, "val/rewards/chosen": 0.1, "epoch": 0.5}
    assert translate({"entropy": 2.0, "num_tokens": 100}) == {"policy/entropy_avg": 2.0, "tokens_seen": 100}
    assert translate({"train_runtime": 3.0, "epoch": 1.0}) == {}


def test_trl_sees_our_templated_prompt_and_tokenizes_it_as_we_do(tiny_model_dir: Path,
                                                                  task_data: dict[str, Path]) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from align import data as D
    from align.config import ModelConfig
    from align.dpo import preference_rows
    from align.modeling import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = D.read_records(str(task_data["pref_val"]))[:4]
    rows, dropped = preference_rows(records, TEMPLATE, tokenizer, 64, "drop")
    assert dropped == 0 and rows[0]["prompt"] == TEMPLATE.format(prompt=records[0].fields["prompt"])
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)), tokenizer, trainable=True)
    args = DPOConfig(output_dir=str(tiny_model_dir.parent / "unused"), report_to="none", max_length=64,
                     gradient_checkpointing=False, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    ours = D.tokenize_pairs(records, TEMPLATE, tokenizer, 64, "drop")[0]
    for row, (chosen, rejected) in zip(trainer.train_dataset, ours):
        assert row["prompt_ids"] + row["chosen_ids"] == chosen.input_ids
        assert row["prompt_ids"] + row["rejected_ids"] == rejected.input_ids


def test_dpo_writes_our_run_dir_and_a_model_eval_reads(tiny_model_dir: Path, task_data: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from align.dpo import train_dpo
    from align.evaluate import evaluate_models

    cfg = from_dict(DPOStageConfig, dpo_dict(tmp_path / "dpo", tiny_model_dir, task_data))
    cfg.validate()
    summary = train_dpo(cfg)
    run = RunDir(tmp_path / "dpo")
    assert run.is_complete() and (run.model / "model.safetensors").is_file() and run.config.is_file()
    assert run.latest_checkpoint() is not None  # TRL's checkpoint-N, marked as ours
    rows = read_metrics(run.metrics)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("train/accuracy", "train/margin", "lr", "tokens_seen", "samples_per_sec", "tokens_per_sec"):
        assert key in train_rows[-1], key
    assert any("val/loss" in r and "val/accuracy" in r for r in rows)
    saved = json.loads(run.summary.read_text())
    assert saved["stage"] == "dpo" and saved["steps"] == 3 and saved["tokens_seen"] > 0
    assert saved["train_time_sec"] > 0 and saved["peak_memory_mb"] > 0 and "val/loss" in saved
    assert summary["steps"] == 3

    ecfg = from_dict(EvalConfig, {"output_dir": str(tmp_path / "eval"), "models": [str(run.root)],
                                  "names": ["sft+dpo"], "prompts": str(task_data["eval"]), "prompt_template": TEMPLATE,
                                  "reference": str(tiny_model_dir), "response_length": 4})
    ecfg.validate()
    result = evaluate_models(ecfg)["models"][0]
    assert result["name"] == "sft+dpo" and "kl_to_reference" in result["metrics"]
    assert result["compute"]["tokens"] == saved["tokens_seen"] and result["compute"]["stages"] == ["dpo"]


def test_dpo_cli_dry_run(tiny_model_dir: Path, task_data: dict[str, Path], tmp_path: Path, align_cli: Any,
                         yaml_writer: Any) -> None:
    path = yaml_writer(tmp_path / "dpo.yaml", dpo_dict(tmp_path / "dpo", tiny_model_dir, task_data))
    r = align_cli("dpo", str(path), "--dry-run", "--set", "beta=0.2")
    assert r.returncode == 0, r.stderr
    assert "dpo: dry run" in r.stdout and "steps: 3" in r.stdout
    assert not (tmp_path / "dpo").exists()
    from align.config import load_config
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config(DPOStageConfig, path, ["train.early_stopping_patience=2"])


def test_dpo_resumes_from_its_marked_checkpoint(tiny_model_dir: Path, task_data: dict[str, Path],
                                                tmp_path: Path) -> None:
    """An interrupted TRL stage (simulated: the run's end removed, `latest` back at step 2) resumes
    from TRL's checkpoint: only step 3 is trained again, and metrics.jsonl reads as one run."""
    import shutil

    from align.dpo import train_dpo

    cfg = from_dict(DPOStageConfig, dpo_dict(tmp_path / "dpo", tiny_model_dir, task_data))
    cfg.validate()
    train_dpo(cfg)
    run = RunDir(tmp_path / "dpo")
    run.summary.unlink()
    shutil.rmtree(run.model)
    shutil.rmtree(run.checkpoints / "checkpoint-3", ignore_errors=True)
    (run.checkpoints / "latest").write_text("checkpoint-2")
    with pytest.raises(Exception, match="--resume"):
        train_dpo(cfg)
    summary = train_dpo(cfg, resume=True)
    assert summary["steps"] == 3 and run.is_complete()
    assert [r["step"] for r in read_metrics(run.metrics) if "train/loss" in r] == [1, 2, 3]
