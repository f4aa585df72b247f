"""`align export RUN OUT` (issue 15): a portable model that loads with from_pretrained after the
run directory and its base are gone, with its card; `--push-to-hub` up to the hub call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.config import RMConfig, SFTConfig, from_dict

TEMPLATE = "Q: {prompt}\nA: "
IDS = torch.tensor([[5, 70, 71, 72, 9, 80]])


def export(*args: str) -> Any:
    return CliRunner().invoke(main, ["export", *map(str, args)])


def logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def text_files(root: Path) -> dict[str, str]:
    out = {}
    for f in root.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".jinja", ".txt", ""):
            out[str(f.relative_to(root))] = f.read_text(encoding="utf-8", errors="replace")
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, addition_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    """A LoRA SFT run on a copy of the tiny model, both under one project directory, and the logits
    align computes from the run's adapter."""
    from transformers import AutoModelForCausalLM

    from align.config import ModelConfig
    from align.modeling import load_pretrained, load_tokenizer
    from align.sft import train_sft

    project = tmp_path_factory.mktemp("trained") / "project"
    base = project / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = from_dict(SFTConfig, {
        "output_dir": str(project / "sft"), "seed": 0, "model": {"path": str(base)},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "data": {"train": str(addition_data["sft_train"]), "val_fraction": 0.0, "prompt_template": TEMPLATE,
                 "max_length": 24},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 3e-2, "log_every": 1, "mixed_precision": "no"}})
    cfg.validate()
    train_sft(cfg)
    model_dir = project / "sft" / "model"
    tok = load_tokenizer(str(model_dir))
    want = logits(load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(model_dir)), tok, trainable=False))
    untrained = logits(load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(base)), tok, trainable=False))
    assert not torch.allclose(want, untrained)  # the adapter changes the model: a merge that drops it would show
    return {"project": project, "logits": want}


@pytest.fixture
def lora_run(trained: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The trained project copied under `tmp_path`, for a test to move or delete (the adapter finds
    its base through align_base.json, relative)."""
    project = tmp_path / "project"
    shutil.copytree(trained["project"], project)
    return {"project": project, "run": project / "sft", "base": project / "base", "logits": trained["logits"]}


def test_merged_export_loads_after_the_run_and_its_base_are_deleted(lora_run: dict[str, Any], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    result = export(lora_run["run"], out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"export: wrote {out}"
    shutil.rmtree(lora_run["project"])  # the run directory and the base model are gone

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model), lora_run["logits"], atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"
    assert GenerationConfig.from_pretrained(out).eos_token_id == AutoTokenizer.from_pretrained(out).eos_token_id
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "merged into its base model" in card.text
    assert "model = AutoModelForCausalLM.from_pretrained(path)" in card.text
    for name, text in text_files(out).items():
        assert str(tmp_path) not in text, f"{name} names a machine path"
    assert not (out / "align_base.json").exists()


def test_adapter_only_export_records_a_hub_base_and_no_path(lora_run: dict[str, Any], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    result = export(lora_run["run"], out, "--adapter-only")
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.strip().startswith("error: --adapter-only: the adapter's base model is the local directory")
    assert "pass --base-model REPO_ID" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    result = export(lora_run["run"], out, "--adapter-only", "--base-model", "someone/tiny-base")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny-base"
    assert not (out / "align_base.json").exists() and not (out / "model.safetensors").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model is None  # the lineage's base is local
    assert "its base model is `someone/tiny-base`" in card.text
    for name, text in text_files(out).items():
        assert str(tmp_path) not in text, f"{name} names a machine path"

    # The base, fetched from wherever it is published (here: a copy), takes the adapter as exported.
    published = tmp_path / "published-base"
    shutil.copytree(lora_run["base"], published)
    shutil.rmtree(lora_run["project"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(published), out)
    assert torch.allclose(logits(model), lora_run["logits"], atol=1e-5)


def test_reward_model_export_keeps_the_scoring_reproducible(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The exported reward model: the head as saved, align_reward.json without a machine path, and a
    card whose snippet still gives align's score from OUT alone."""
    from test_reward_head import PAIRS, align_scores, run_snippet, write_jsonl

    from align.rm import train_rm

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}?", "chosen": "a" * (1 + i % 4),
                                                    "rejected": "b" * (1 + i % 3)} for i in range(32)])
    norm = write_jsonl(tmp_path / "norm.jsonl", [{"prompt": "1?", "response": "ab"}])
    cfg = from_dict(RMConfig, {
        "output_dir": str(tmp_path / "rm"), "seed": 0, "model": {"path": str(tiny_model_dir)},
        "normalize_with": str(norm), "data": {"train": str(pairs), "val_fraction": 0.0, "max_length": 16,
                                              "prompt_template": TEMPLATE},
        "train": {"max_steps": 2, "batch_size": 16, "lr": 3e-3, "mixed_precision": "no"}})
    cfg.validate()
    train_rm(cfg)
    want = align_scores(tmp_path / "rm" / "model")
    out = tmp_path / "out"
    assert export(tmp_path / "rm", out).exit_code == 0
    saved = json.loads((out / "align_reward.json").read_text())
    assert saved["normalized_with"] == "norm.jsonl" and saved["bias"] != 0.0
    for name, text in text_files(out).items():
        assert str(tmp_path) not in text, f"{name} names a machine path"
    shutil.rmtree(tmp_path / "rm")
    assert torch.allclose(torch.tensor(run_snippet(out)), want, atol=1e-5, rtol=0)
    assert len(PAIRS) == len(want)


def test_export_errors_are_one_line(lora_run: dict[str, Any], tmp_path: Path) -> None:
    run = lora_run["run"]
    cases = [
        ((tmp_path / "nowhere", tmp_path / "o1"), f"error: RUN '{tmp_path / 'nowhere'}' does not exist"),
        ((run, tmp_path / "o2", "--push-to-hub", "bad//id"),
         "error: --push-to-hub: 'bad//id' is not a valid hub repo id"),
        ((run, tmp_path / "o3", "--private"), "error: --private applies to --push-to-hub"),
        ((run, run / "model"), f"error: OUT '{run / 'model'}' is the run directory or holds it"),
        ((run, tmp_path / "o4", "--base-model", "a/b"), "error: --base-model applies to --adapter-only exports"),
    ]
    for args, start in cases:
        result = export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(start) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    (run / "summary.json").rename(run / "summary.moved")  # an unfinished run
    result = export(run, tmp_path / "o5")
    assert result.exit_code == 2 and not (tmp_path / "o5").exists()
    assert result.stderr.strip() == (f"error: RUN '{run}' has no finished model (no summary.json in '{run}'); finish "
                                     "the run first (rerun the stage, or --resume it)")
    (run / "summary.moved").rename(run / "summary.json")

    full = tmp_path / "full"
    assert export(run, full).exit_code == 0
    again = export(run, full)  # OUT exists and is not empty
    assert again.exit_code == 2 and again.stderr.startswith(f"error: OUT '{full}' exists and is not empty")
    (full / "README.md").write_text("stale")
    assert export(run, full, "--force").exit_code == 0
    assert (full / "README.md").read_text().startswith("---\n")
    result = export(full, tmp_path / "o6")  # an export is no run
    assert result.exit_code == 2 and "has no finished model" in result.stderr


def test_push_to_hub_calls_upload_folder_with_the_export(lora_run: dict[str, Any], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(("create_repo", args, kwargs))
        return "https://huggingface.co/someone/tiny-sft"

    def upload_folder(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("upload_folder", args, {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"])
                                                                       .iterdir())}))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/tiny-sft/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    result = export(lora_run["run"], out, "--push-to-hub", "someone/tiny-sft", "--private")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create_repo", ("someone/tiny-sft",), {"repo_type": "model", "private": True, "exist_ok": True})
    name, args, kwargs = calls[1]
    assert name == "upload_folder" and args == ()
    assert kwargs["repo_id"] == "someone/tiny-sft" and kwargs["repo_type"] == "model"
    assert kwargs["folder_path"] == str(out)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(kwargs["files"])
    assert "export: pushed to https://huggingface.co/someone/tiny-sft/commit/abc" in result.stdout

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "upload_folder", refused)
    result = export(lora_run["run"], tmp_path / "out2", "--push-to-hub", "someone/tiny-sft")
    assert calls[-1][0] == "create_repo" and calls[-1][2]["private"] is None  # the account's default
    assert result.exit_code == 2 and (tmp_path / "out2" / "model.safetensors").is_file()
    assert result.stderr.strip() == (f"error: exported to '{tmp_path / 'out2'}', but pushing it to 'someone/tiny-sft' "
                                     "failed: 401 Client Error: Unauthorized")


def test_adapter_only_export_of_a_grown_vocabulary_is_refused(lora_run: dict[str, Any], tmp_path: Path) -> None:
    """An adapter whose run grew the vocabulary needs the grown base saved beside it (model/base/):
    the published base lacks the pad token's rows, so only the merged export is portable."""
    from align.modeling import GROWN_BASE_DIR

    (lora_run["run"] / "model" / GROWN_BASE_DIR).mkdir()
    result = export(lora_run["run"], tmp_path / "out", "--adapter-only", "--base-model", "someone/tiny-base")
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "grew the vocabulary" in result.stderr and "--merge" in result.stderr
    assert not (tmp_path / "out").exists()
