"""The guards behind some of test_bad_inputs.py's cases, tested on their own: strict weight loading
(and its one opt-in exception, a new score head), weight headers, path-or-hub-id, strict YAML,
JSON that every reader parses, and `align task` reusing an identical task."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from align.cli import main
from align.config import ModelConfig
from align.errors import AlignError, ConfigError

BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


# ----------------------------------------------------------------------------------------------
# Weights


def test_a_causal_lm_loads_strictly_and_tied_embeddings_are_not_missing(tiny_model_dir: Path, tmp_path: Path,
                                                                        tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from align.modeling import init_tiny_model, load_pretrained

    load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(tiny_model_dir)), tokenizer, trainable=False)
    # a tied model's file holds no lm_head.weight: transformers ties it, so nothing is missing
    tied = init_tiny_model(tmp_path / "tied", hidden=32, layers=1, heads=4, max_position=64)
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(tied)), tokenizer, trainable=False)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_a_new_score_head_is_an_error_unless_asked_for_and_then_noted_once(
        tiny_model_dir: Path, tokenizer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification

    from align import modeling
    from align.modeling import load_pretrained

    monkeypatch.setattr(modeling, "_NOTED_NEW_HEADS", set())  # earlier tests may have noted this path

    cfg = ModelConfig(path=str(tiny_model_dir))
    with pytest.raises(AlignError, match=r"has no score head \(its weights lack score.weight\)"):
        load_pretrained(AutoModelForSequenceClassification, cfg, tokenizer, trainable=False, num_labels=1)
    capsys.readouterr()
    for _ in range(2):
        load_pretrained(AutoModelForSequenceClassification, cfg, tokenizer, trainable=True, num_labels=1,
                        new_head_ok=True)
    assert capsys.readouterr().out.splitlines() == [f"note: {tiny_model_dir} has no score head; a new one is "
                                                    "initialised (expected for a new reward model / critic)"]


def test_load_score_model_starts_a_reward_model_or_critic_from_a_causal_lm(tiny_model_dir: Path, tokenizer,
                                                                          tmp_path: Path) -> None:
    """What rm.py and the critic do: a new head from the SFT model; strict from a classifier."""
    from align.config import LoraConfig
    from align.modeling import load_score_model

    model = load_score_model(ModelConfig(path=str(tiny_model_dir)), LoraConfig(), tokenizer, torch.device("cpu"))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    again = load_score_model(ModelConfig(path=str(tmp_path / "rm")), LoraConfig(), tokenizer, torch.device("cpu"))
    assert torch.equal(again.model.score.weight, model.model.score.weight)


def test_weights_of_another_shape_name_the_tensor(tiny_model_dir: Path, tmp_path: Path, tokenizer) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from align.modeling import load_pretrained

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros(100, 32)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AlignError, match=r"1 tensor\(s\) have another shape .*lm_head.weight: \(100, 32\) in the file"):
        load_pretrained(AutoModelForCausalLM, ModelConfig(path=str(tmp_path / "m")), tokenizer, trainable=False)


def test_check_weights_opens_headers_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    from align.modeling import check_weights

    check_weights(tiny_model_dir, "model.path")
    check_weights("org/name", "model.path")  # a hub id: nothing local to check
    for name, damage in {"empty": b"", "short-header": b"\x10\x00", "cut": None}.items():
        model = tmp_path / name
        shutil.copytree(tiny_model_dir, model)
        file = model / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-1] if damage is None else damage)
        with pytest.raises(AlignError, match=rf"config key 'critic.path': weights file '{file}' is damaged"):
            check_weights(model, "critic.path")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(AlignError, match="names shard 'model-00002.safetensors', which is missing"):
        check_weights(sharded, "model.path")
    legacy = tmp_path / "bin"
    legacy.mkdir()
    torch.save({"w": torch.zeros(2)}, legacy / "pytorch_model.bin")
    check_weights(legacy, "model.path")
    (legacy / "pytorch_model.bin").write_bytes((legacy / "pytorch_model.bin").read_bytes()[:100])
    with pytest.raises(AlignError, match="pytorch_model.bin' is damaged or truncated"):
        check_weights(legacy, "model.path")


@pytest.mark.parametrize("path, is_path", [
    ("./runs/sfft", True), ("../sft", True), ("/abs/missing", True), ("~/runs/sft", True), ("runs/sft/", True),
    ("runs/sft/model", True), ("runs\\sft", True), ("my runs/sft", True), ("gpt2", False),
    ("Qwen/Qwen2.5-0.5B", False), ("org/name.v1_2", False)])
def test_what_looks_like_a_path(path: str, is_path: bool) -> None:
    from align.modeling import looks_like_path, resolve_model_path

    assert looks_like_path(path) is is_path
    if is_path:
        with pytest.raises(AlignError, match=f"model path '{path}' does not exist".replace("\\", "\\\\")):
            resolve_model_path(path)
    else:
        assert resolve_model_path(path) == path  # left to the hub


# ----------------------------------------------------------------------------------------------
# YAML


def test_duplicate_keys_are_refused_at_any_depth_and_merges_still_work() -> None:
    from align.yaml_io import load_yaml

    with pytest.raises(ConfigError, match=r"^c.yaml:4: duplicate key 'lr' \(first at line 3\)"):
        load_yaml("seed: 1\ntrain:\n  lr: 0.1\n  lr: 0.2\n", "c.yaml")
    assert load_yaml("base: &b {lr: 1, bs: 2}\ntrain:\n  <<: *b\n  lr: 3\n") == {
        "base": {"lr": 1, "bs": 2}, "train": {"lr": 3, "bs": 2}}
    assert load_yaml("1: a\n'1': b\n") == {1: "a", "1": "b"}  # an int and a string are two keys


def test_an_alias_bomb_fails_fast_and_small_aliases_still_load(tmp_path: Path) -> None:
    from align.yaml_io import MAX_NODES, expanded_size, load_yaml, read_yaml

    assert len(BOMB) < 512
    (tmp_path / "bomb.yaml").write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"bomb.yaml: expands to more than {MAX_NODES:,} nodes"):
        read_yaml(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 0.5
    result = CliRunner().invoke(main, ["sft", str(tmp_path / "bomb.yaml")])
    assert result.exit_code == 2 and "expands to more than" in result.stderr
    assert time.perf_counter() - start < 1.0
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]\n") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    import yaml

    # the mapping, a: [1, 2], b: [[1, 2], [1, 2]]
    assert expanded_size(yaml.compose("a: &a [1, 2]\nb: [*a, *a]\n")) == 1 + (1 + 3) + (1 + (1 + 3 + 3))


def test_recursive_and_deeply_nested_yaml_are_one_line_errors() -> None:
    from align.yaml_io import load_yaml

    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_yaml("a: &a [1, *a]\n", "r.yaml")
    with pytest.raises(ConfigError, match=r"^d.yaml:1: nested more than 100 levels deep"):
        load_yaml("[" * 300 + "]" * 300, "d.yaml")


# ----------------------------------------------------------------------------------------------
# JSON


def test_json_safe_replaces_non_finite_floats_by_null() -> None:
    from align.rundir import json_safe

    value = {"loss": float("nan"), "ppl": float("inf"), "ok": 1.5, "n": 3, "flag": True, "name": "x",
             "rows": [{"kl": float("-inf")}, (1.0, float("nan"))], "none": None}
    safe = json_safe(value)
    assert safe == {"loss": None, "ppl": None, "ok": 1.5, "n": 3, "flag": True, "name": "x",
                    "rows": [{"kl": None}, [1.0, None]], "none": None}
    assert math.isnan(value["loss"])  # the input is left alone
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == safe
    with pytest.raises(ValueError):
        json.dumps(value, allow_nan=False)  # what a strict reader would reject


def test_lineage_reads_null_numbers_of_a_summary_as_zero(tmp_path: Path) -> None:
    from align.evaluate import lineage_compute

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"stage": "sft", "train_time_sec": None, "wall_time_sec": 2.0,
                                                  "tokens_seen": 10, "peak_memory_mb": None}))
    assert lineage_compute(str(run)) == {"wall_time_sec": 2.0, "tokens": 10, "episodes": 0, "peak_memory_mb": 0,
                                         "stages": ["sft"]}
    (run / "summary.json").write_text(json.dumps({"tokens_seen": "ten"}))
    with pytest.raises(AlignError, match=f"{run / 'summary.json'}: key 'tokens_seen' must be a number, got str"):
        lineage_compute(str(run))


def test_a_json_array_data_file_with_a_lone_surrogate_names_the_record(tmp_path: Path) -> None:
    from align.data import read_records

    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a", "response": "b"}, {"prompt": "\\ud83d", "response": "b"}]')
    with pytest.raises(AlignError, match=r"d.json\[2\]: field 'prompt' holds a lone UTF-16 surrogate"):
        read_records(str(path))
    path.write_text('[{"prompt": "\\ud83d\\ude00", "response": "b"}]')  # a proper pair is one character
    assert read_records(str(path))[0].fields["prompt"] == "\U0001F600"


# ----------------------------------------------------------------------------------------------
# align task


def test_task_reuses_a_directory_holding_the_identical_task(tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["task", "addition", str(out), "--seed", "3", "--size", "n_sft=8", "--size", "n_eval=4"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "already holds task addition with seed 3 and these parameters; reused" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # not rewritten
    other = CliRunner().invoke(main, args[:-1] + ["n_eval=5"])
    assert other.exit_code == 2 and "n_eval=4 (asked 5)" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
