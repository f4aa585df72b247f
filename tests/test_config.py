"""Typed configuration: unknown keys (with the nearest valid key), wrong types, impossible values,
`--set` overrides, Literal choices, and the saved config.yaml round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import SFTConfig, load_config, parse_override, save_config
from align.errors import AlignError, ConfigError

BASE = {"output_dir": "out", "model": {"path": "m"}, "data": {"train": "d.jsonl"}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, extra: str = "", overrides: tuple[str, ...] = ()) -> SFTConfig:
    """The base config plus `extra`; a top-level key of `extra` replaces the base's line (YAML
    refuses a key given twice)."""
    given = {line.split(":")[0] for line in extra.splitlines() if line and not line[0].isspace()}
    base = [line for line in ("output_dir: out", "model: {path: m}", "data: {train: d.jsonl}")
            if line.split(":")[0] not in given]
    return load_config(SFTConfig, write(tmp_path, "\n".join(base) + "\n" + extra), overrides)


def error_of(tmp_path: Path, extra: str = "", overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, extra, overrides)
    message = str(e.value)
    assert "\n" not in message, "errors are one line"
    assert isinstance(e.value, AlignError) and e.value.exit_code == 2
    return message


def test_valid_config_loads_with_types_converted(tmp_path: Path) -> None:
    cfg = load(tmp_path, "train: {lr: 1e-4, max_steps: 30, warmup_steps: 3}\nlora: {target: [q_proj, v_proj]}\n")
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.train.max_steps == 30 and cfg.train.warmup_steps == 3
    assert cfg.lora.target == ["q_proj", "v_proj"]
    assert cfg.model.path == "m" and cfg.data.train == "d.jsonl"


@pytest.mark.parametrize(("extra", "key", "nearest"), [
    ("train: {lrr: 0.1}\n", "train.lrr", "train.lr"),
    ("ouput_dir: x\n", "ouput_dir", "output_dir"),
    ("lora: {alfa: 4}\n", "lora.alfa", "lora.alpha"),
    ("data: {train: d.jsonl, max_lenght: 12}\n", "data.max_lenght", "data.max_length"),
])
def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path: Path, extra: str, key: str, nearest: str) -> None:
    message = error_of(tmp_path, extra)
    assert f"'{key}'" in message
    assert f"did you mean '{nearest}'" in message


def test_unknown_key_with_no_near_match_lists_valid_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train: {zzzzzz: 1}\n")
    assert "'train.zzzzzz'" in message and "valid keys" in message and "batch_size" in message


@pytest.mark.parametrize(("extra", "key"), [
    ("train: {batch_size: eight}\n", "train.batch_size"),
    ("train: {batch_size: 2.5}\n", "train.batch_size"),
    ("train: {lr: fast}\n", "train.lr"),
    ("lora: {enabled: 3}\n", "lora.enabled"),
    ("train: {adam_betas: 0.9}\n", "train.adam_betas"),
    ("train: {adam_betas: [0.9, high]}\n", "train.adam_betas[1]"),
    ("model: just-a-string\n", "model"),
    ("seed: [1]\n", "seed"),
])
def test_wrong_types_are_rejected_naming_the_key(tmp_path: Path, extra: str, key: str) -> None:
    # later YAML keys override earlier ones, so `extra` replaces a base section where it repeats one
    assert f"'{key}'" in error_of(tmp_path, extra)


@pytest.mark.parametrize(("extra", "key"), [
    ("train: {lr: -0.001}\n", "train.lr"),
    ("train: {lr: 0}\n", "train.lr"),
    ("train: {max_steps: 10, warmup_steps: 10}\n", "train.warmup_steps"),
    ("train: {max_steps: 10, warmup_steps: 50}\n", "train.warmup_steps"),
    ("lora: {r: 0}\n", "lora.r"),
    ("train: {batch_size: 0}\n", "train.batch_size"),
    ("train: {grad_accum: 0}\n", "train.grad_accum"),
    ("train: {adam_betas: [0.9]}\n", "train.adam_betas"),
    ("data: {train: d.jsonl, val_fraction: 1.0}\n", "data.val_fraction"),
    ("lora: {target: []}\n", "lora.target"),
])
def test_impossible_values_are_rejected_naming_the_key(tmp_path: Path, extra: str, key: str) -> None:
    assert f"'{key}'" in error_of(tmp_path, extra)


def test_warmup_shorter_than_training_is_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, "train: {max_steps: 10, warmup_steps: 9}\n").train.warmup_steps == 9


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {path: m}\ndata: {train: d.jsonl}\n")
    with pytest.raises(ConfigError, match="missing required config key 'output_dir'"):
        load_config(SFTConfig, path)


def test_literal_choices(tmp_path: Path) -> None:
    assert load(tmp_path, "data: {train: d.jsonl, truncation: truncate}\n").data.truncation == "truncate"
    message = error_of(tmp_path, "data: {train: d.jsonl, truncation: clip}\n")
    assert "'data.truncation'" in message and "drop, truncate, error" in message and "'clip'" in message
    assert "'data.format'" in error_of(tmp_path, "data: {train: d.jsonl, format: sharegpt}\n")


def test_set_overrides_dotted_keys_lists_and_nulls(tmp_path: Path) -> None:
    cfg = load(tmp_path, "train: {lr: 0.1, max_steps: 5}\n", overrides=(
        "train.lr=1e-4", "train.batch_size=3", "lora.target=[q_proj,v_proj]", "train.adam_betas=[0.8, 0.95]",
        "train.max_steps=null", "lora.enabled=true", "data.validation=v.jsonl", "seed=7"))
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 3
    assert cfg.lora.target == ["q_proj", "v_proj"]
    assert cfg.train.adam_betas == [0.8, 0.95]
    assert cfg.train.max_steps is None
    assert cfg.lora.enabled is True
    assert cfg.data.validation == "v.jsonl" and cfg.data.train == "d.jsonl"  # siblings kept
    assert cfg.seed == 7


def test_set_without_a_file(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, None, ("output_dir=o", "model.path=m", "data.train=t.jsonl"))
    assert (cfg.output_dir, cfg.model.path, cfg.data.train) == ("o", "m", "t.jsonl")


@pytest.mark.parametrize(("override", "expected"), [
    ("train.lrr=1", "'train.lrr'; did you mean 'train.lr'"),
    ("train.lr=-1", "'train.lr' must be > 0"),
    ("train.lr.x=1", "train.lr"),
    ("train.lr", "key=value"),
])
def test_bad_set_overrides(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in error_of(tmp_path, "train: {lr: 0.1}\n", overrides=(override,))


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=") == ("a", "")
    assert parse_override(" a = 3") == ("a", 3)
    assert parse_override("x=y=z") == ("x", "y=z")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: out\ntrain: {lr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, path)
    assert str(path) in str(e.value) and "invalid YAML" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load(tmp_path, "train: {lr: 3e-4, max_steps: 9, adam_betas: [0.8, 0.9]}\n"
                         "lora: {enabled: true, target: [q_proj], merge: true}\n"
                         "data: {train: d.jsonl, prompt_template: \"User: {instruction}\\nAssistant: \"}\n")
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)
    again = load_config(SFTConfig, saved)
    assert again == cfg
    assert again.data.prompt_template == "User: {instruction}\nAssistant: "
    # and the defaults were written out in full: every key is in the file
    assert "early_stopping_patience" in saved.read_text(encoding="utf-8")
