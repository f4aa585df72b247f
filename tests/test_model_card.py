"""Model cards (issue 15): every stage's model/ gets a README.md with hub metadata, the lineage of
stages and data, key hyper-parameters, the final metrics and how to load it; written before
summary.json, so a complete run always has its card."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from align.card import CARD, model_card
from align.config import DPOStageConfig, GRPOStageConfig, RMConfig, SFTConfig, from_dict
from align.rundir import RunDir

TEMPLATE = "Q: {prompt}\nA: "


def build(cls: type, data: dict[str, Any]) -> Any:
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """sft -> grpo (a LoRA adapter, a reward function), sft -> rm, sft -> dpo: a few steps each."""
    from align.dpo import train_dpo
    from align.ppo import train_ppo
    from align.rm import train_rm
    from align.sft import train_sft
    from align.tasks.addition import build as build_task

    root = tmp_path_factory.mktemp("chain")
    task = build_task(root / "task", seed=0, n_digits=1, n_sft=0, n_pref=64, n_prompts=32, n_eval=4)
    common = {"seed": 0, "data": {"prompt_template": TEMPLATE, "max_length": 24}}
    train = {"batch_size": 8, "lr": 1e-3, "log_every": 1, "mixed_precision": "no"}
    train_sft(build(SFTConfig, {**common, "output_dir": str(root / "sft"), "model": {"path": str(tiny_model_dir)},
                                "data": {**common["data"], "train": str(addition_data["sft_train"]),
                                         "validation": str(addition_data["sft_val"])},
                                "train": {**train, "max_steps": 3, "eval_every": 3}}))
    train_rm(build(RMConfig, {**common, "output_dir": str(root / "rm"), "model": {"path": str(root / "sft")},
                              "data": {**common["data"], "train": str(task["pref_train"]), "val_fraction": 0.0},
                              "train": {**train, "max_steps": 2}}))
    train_ppo(build(GRPOStageConfig, {
        **common, "output_dir": str(root / "grpo"), "model": {"path": str(root / "sft")}, "memory_mode": "lora",
        "reward": {"function": "toy_rewards:fraction_of_sevens"},
        "data": {**common["data"], "train": str(task["prompts"]), "max_length": 16},
        "ppo": {"total_episodes": 16, "rollout_batch_size": 8, "n_samples_per_prompt": 2, "mini_batch_size": 8,
                "micro_batch_size": 8, "ppo_epochs": 1, "response_length": 4, "lr": 1e-3, "mixed_precision": "no",
                "eval_every": 1000, "sample_every": 1000, "save_every": 1000}}))
    train_dpo(build(DPOStageConfig, {**common, "output_dir": str(root / "dpo"), "model": {"path": str(root / "sft")},
                                     "data": {**common["data"], "train": str(task["pref_train"]), "val_fraction": 0.0},
                                     "train": {**train, "max_steps": 2, "batch_size": 4, "save_every": 1000}}))
    return {"root": root, **{name: root / name for name in ("sft", "rm", "grpo", "dpo")}}


def read_card(run: Path) -> tuple[dict[str, Any], str]:
    """(metadata, body) as the hub reads them: `huggingface_hub.ModelCard`, and the raw YAML."""
    from huggingface_hub import ModelCard

    path = run / "model" / CARD
    card = ModelCard.load(path)
    text = path.read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---\n")[1])
    assert card.data.to_dict() == front
    return front, card.text


def table_rows(body: str, heading: str) -> list[list[str]]:
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[2:]]  # without the header and its rule


@pytest.mark.parametrize("stage, library, pipeline, tags", [
    ("sft", "transformers", "text-generation", {"align", "sft"}),
    ("rm", "transformers", "text-classification", {"align", "sft", "reward-model"}),
    ("grpo", "peft", "text-generation", {"align", "sft", "rlhf", "grpo", "lora", "peft"}),
    ("dpo", "transformers", "text-generation", {"align", "sft", "dpo", "trl"}),
])
def test_every_stage_writes_a_card_with_hub_metadata(chain: dict[str, Path], stage: str, library: str, pipeline: str,
                                                     tags: set[str]) -> None:
    front, body = read_card(chain[stage])
    assert front["library_name"] == library and front["pipeline_tag"] == pipeline
    assert set(front["tags"]) == tags
    assert "base_model" not in front and "datasets" not in front  # a local base and local files
    summary = json.loads((chain[stage] / "summary.json").read_text())
    # The final metrics are the summary's.
    metrics = {k.strip("`"): v for k, v in table_rows(body, "Final metrics")}
    assert metrics and set(metrics) == {k for k, v in summary.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, shown in metrics.items():
        assert float(shown) == pytest.approx(summary[key], rel=1e-5), key
    # No machine path: the card can go to the hub as it is.
    assert str(chain["root"]) not in body and str(chain["root"].resolve()) not in body


def test_the_card_shows_the_chain_of_stages_data_and_hyper_parameters(chain: dict[str, Path]) -> None:
    _, body = read_card(chain["grpo"])
    lineage = table_rows(body, "Lineage")
    assert [row[0] for row in lineage] == ["sft", "grpo"]
    assert lineage[0][1] == "`tiny`" and lineage[1][1] == "`sft`"
    inputs = json.loads((chain["sft"] / "inputs.json").read_text())
    (train_hash,) = [h for p, h in inputs.items() if p.endswith("sft_train.jsonl")]
    assert f"data.train: `sft_train.jsonl` (sha256 {train_hash[:12]})" in lineage[0][2]
    assert "reward.function: `toy_rewards:fraction_of_sevens`" in lineage[1][2]
    assert "Base model: `tiny`." in body
    hyper = {(s, k.strip("`")): v for s, k, v in table_rows(body, "Hyper-parameters")}
    assert hyper[("sft", "train.max_steps")] == "3" and hyper[("sft", "train.lr")] == "0.001"
    assert ("sft", "lora.r") not in hyper  # LoRA was off
    assert hyper[("grpo", "ppo.estimator")] == "`'grpo'`" and hyper[("grpo", "ppo.total_episodes")] == "16"
    assert hyper[("grpo", "memory_mode")] == "`'lora'`"
    assert hyper[("grpo", "data.prompt_template")] == "`'Q: {prompt}\\nA: '`"
    assert "AutoPeftModelForCausalLM.from_pretrained(path)" in body
    assert "Provenance" in body and "transformers" in body.split("## Provenance")[1]


def test_each_card_names_the_loader_its_model_needs(chain: dict[str, Path]) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    for stage, loader in (("sft", AutoModelForCausalLM), ("grpo", AutoPeftModelForCausalLM),
                          ("dpo", AutoModelForCausalLM)):
        _, body = read_card(chain[stage])
        assert f"model = {loader.__name__}.from_pretrained(path)" in body, stage
        assert loader.from_pretrained(chain[stage] / "model") is not None


def test_the_card_is_written_before_the_summary(chain: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """write_summary writes the card first: when summary.json appears, README.md is complete; and a
    failing card leaves no summary (the run does not look complete)."""
    import shutil

    import align.card
    import align.rundir

    run = RunDir(tmp_path / "sft")
    shutil.copytree(chain["sft"], run.root)
    summary = json.loads((run.root / "summary.json").read_text())
    (run.root / "summary.json").unlink()
    (run.model / CARD).unlink()
    seen = []
    real = align.rundir.write_json

    def spy(path: Path, value: Any) -> None:
        if path == run.summary:
            seen.append((run.model / CARD).read_text(encoding="utf-8"))
        real(path, value)

    monkeypatch.setattr(align.rundir, "write_json", spy)
    align.rundir.write_summary(run, summary)
    assert seen and seen[0] == (run.model / CARD).read_text(encoding="utf-8") and seen[0].startswith("---\n")

    run.summary.unlink()
    monkeypatch.setattr(align.card, "model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        align.rundir.write_summary(run, summary)
    assert not run.summary.exists()


def test_hub_base_model_and_datasets_go_into_the_metadata(tmp_path: Path) -> None:
    """A run started from a hub model on a hub dataset (no download: the card reads config files)."""
    run = RunDir(tmp_path / "dpo")
    run.model.mkdir(parents=True)
    (run.model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    config = {"model": {"path": "Qwen/Qwen2.5-0.5B-Instruct"}, "lora": {"enabled": False},
              "data": {"train": "trl-lib/ultrafeedback_binarized", "dataset_config": None, "split": "train",
                       "prompt_template": "{prompt}"}, "beta": 0.1}
    (run.root / "config.yaml").write_text(yaml.safe_dump(config))
    text = model_card(run, {"stage": "dpo", "steps": 10, "val/loss": 0.5})
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "transformers", "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                     "tags": ["align", "dpo", "trl"], "pipeline_tag": "text-generation",
                     "datasets": ["trl-lib/ultrafeedback_binarized"]}
    assert "data.train: `trl-lib/ultrafeedback_binarized`, split `train`" in text
    assert re.search(r"\| dpo \| `beta` \| 0\.1 \|", text)
