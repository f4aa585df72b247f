"""SFT variants in a recipe (align/variants.py): how each is wired from the `sft` section, the
data recipes built on them (recipes/addition_data.yaml, recipes/addition_lora.yaml) load and
dry-run, and a short data recipe runs every stage, then reuses them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.config import ConfigError
from align.pipeline import check_recipe, load_recipe, run_recipe
from align.variants import merge

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "addition_data.yaml"
LORA = REPO / "recipes" / "addition_lora.yaml"


def test_merge_replaces_values_and_merges_sections() -> None:
    base = {"data": {"max_length": 16, "max_samples": 2000}, "train": {"lr": 1e-3}, "lora": {"enabled": False}}
    changed = merge(base, {"data": {"max_samples": 8000}, "lora": {"enabled": True, "target": "all"}, "seed": 3})
    assert changed == {"data": {"max_length": 16, "max_samples": 8000}, "train": {"lr": 1e-3},
                       "lora": {"enabled": True, "target": "all"}, "seed": 3}
    assert base["data"]["max_samples"] == 2000 and base["lora"] == {"enabled": False}  # not modified


def test_the_data_recipe_wires_every_variant_from_the_sft_section(tmp_path: Path) -> None:
    plan = load_recipe(str(DATA), (f"output_root={tmp_path}", "seed=3"))
    sft, variants = plan.stages["sft"], plan.stages["sft_variants"].variants
    assert list(variants) == ["raw_4x", "distilled", "best_of_8", "filtered"]
    for name, v in variants.items():
        assert v.output_dir == str(tmp_path / "sft_variants" / name)
        assert v.model.path == sft.model.path == str(tmp_path / "init") and v.seed == 3
        assert v.train == sft.train and v.data.validation == sft.data.validation  # equal steps, one val set
    assert variants["raw_4x"].data.max_samples == 8000 and variants["raw_4x"].data.train == sft.data.train
    assert variants["distilled"].data.train == str(tmp_path / "data" / "sft_teacher.jsonl")
    assert variants["best_of_8"].data.train == plan.stages["sample"].out == str(tmp_path / "sample" / "samples.jsonl")
    assert variants["filtered"].data.train == plan.stages["curate"].out
    assert {v.data.max_samples for n, v in variants.items() if n != "raw_4x"} == {sft.data.max_samples}
    sample, curate = plan.stages["sample"], plan.stages["curate"]
    assert sample.model == str(tmp_path / "sft") and sample.reward_model == curate.reward_model == str(tmp_path / "rm")
    assert sample.seed == 3 and curate.report == str(tmp_path / "curate" / "summary.json")
    assert plan.stages["eval"].names == ["sft", "sft-raw_4x", "sft-distilled", "sft-best_of_8", "sft-filtered"]
    assert plan.stages["eval"].models[1:] == [v.output_dir for v in variants.values()]


def test_the_lora_recipe_differs_from_full_fine_tuning_in_lora_and_its_lr_alone(tmp_path: Path) -> None:
    import dataclasses

    plan = load_recipe(str(LORA), (f"output_root={tmp_path}",))
    full, variants = plan.stages["sft"], plan.stages["sft_variants"].variants
    assert not full.lora.enabled
    for v in variants.values():
        assert v.lora.enabled and v.lora.target == "all"
        assert v.data == full.data  # equal data
        assert v.train.lr > full.train.lr and dataclasses.replace(v.train, lr=full.train.lr) == full.train  # equal steps


@pytest.mark.parametrize("recipe", [DATA, LORA])
def test_the_recipes_dry_run(recipe: Path, tmp_path: Path) -> None:
    plans = check_recipe(load_recipe(str(recipe), (f"output_root={tmp_path}",)))
    status = {p["stage"]: p["status"] for p in plans}
    assert status["sft_variants"].startswith("inputs produced by") and "init_model" in status["sft_variants"]
    assert status["eval"].startswith("inputs produced by") and "sft_variants" in status["eval"]
    assert not (tmp_path / "sft_variants").exists()


def test_a_variant_with_a_bad_key_or_name_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'sft_variants\.raw_4x\.data\.max_sample'"):
        load_recipe(str(DATA), (f"output_root={tmp_path}", "sft_variants.raw_4x.data.max_sample=3"))
    with pytest.raises(ConfigError, match=r"'sft_variants\.x' must be a section"):
        load_recipe(str(DATA), (f"output_root={tmp_path}", "sft_variants.x=3"))
    with pytest.raises(ConfigError, match="a variant's name must be"):
        load_recipe(str(DATA), (f"output_root={tmp_path}", "sft_variants={a/b: {}}"))


SHORT = ("task.n_sft=96", "task.n_pref=64", "task.n_eval=8", "init_model.hidden=32", "init_model.layers=1",
         "sft.data.max_samples=48", "sft.train.max_steps=3", "sft.train.batch_size=16", "sft.train.warmup_steps=0",
         "sft.train.eval_every=3", "rm.train.max_steps=2", "rm.train.batch_size=16", "rm.train.warmup_steps=0",
         "rm.train.eval_every=2", "sample.max_samples=48", "sample.best_of=2", "curate.min_score=-1000",
         "curate.target=20", "sft_variants.raw_4x.data.max_samples=96", "eval.sampled=false",
         "sft_variants.best_of_8.data.max_length=64")  # an untrained model samples any bytes


def test_a_short_data_recipe_runs_every_stage_then_reuses_them(tmp_path: Path, capsys) -> None:
    root = tmp_path / "run"
    run_recipe(str(DATA), (f"output_root={root}", *SHORT))
    rows = {m["name"]: m for m in json.loads((root / "eval" / "results.json").read_text())["models"]}
    assert list(rows) == ["sft", "sft-raw_4x", "sft-distilled", "sft-best_of_8", "sft-filtered"]
    assert all("gold_reward" in m["metrics"] for m in rows.values())
    samples = (root / "sample" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 48 and "score" in json.loads(samples[0])
    assert len((root / "curate" / "curated.jsonl").read_text().splitlines()) == 20
    summary = json.loads((root / "sft_variants" / "summary.json").read_text())
    assert summary["raw_4x/examples"] == 96 and summary["filtered/examples"] == 20
    assert summary["distilled/examples"] == summary["best_of_8/examples"] == 48
    assert summary["raw_4x/steps"] == summary["filtered/steps"] == 3  # equal steps
    assert json.loads((root / "curate" / "summary.json").read_text())["kept"] == 20
    capsys.readouterr()
    run_recipe(str(DATA), (f"output_root={root}", *SHORT))
    out = capsys.readouterr().out
    for stage in ("sft", "rm", "sample", "curate", "sft_variants"):
        assert f": {stage}: complete, skipped" in out, out


def test_best_of_k_data_leaves_out_empty_responses() -> None:
    """A model that chooses EOS at once keeps an empty response, which `align sft` refuses: the
    rejection-sampled data leaves such a prompt out (a full run hit it: recipes/README.md)."""
    from align.best_of_n import sft_rows

    rows = [{"prompt": "1+1=", "response": "", "score": 3.0}, {"prompt": "2+2=", "response": " \n", "score": 2.0},
            {"prompt": "3+3=", "response": "6", "score": 1.0}]
    assert sft_rows(rows) == [rows[2]]


def test_the_lora_recipe_runs_the_default_recipes_task_and_sft(tmp_path: Path) -> None:
    """So its full fine-tuning arm is the default recipe's SFT, and a copy of those runs is reused."""
    lora = load_recipe(str(LORA), (f"output_root={tmp_path}",))
    default = load_recipe(str(REPO / "recipes" / "addition.yaml"), (f"output_root={tmp_path}",))
    for stage in ("task", "init_model", "sft"):
        assert lora.stages[stage] == default.stages[stage], stage
