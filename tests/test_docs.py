"""The docs against the code: the configuration reference is exactly what `align.docgen` generates
from align/config.py, every config key has a description, and the shipped recipes load."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from align import docgen
from align.config import SFTConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_up_to_date() -> None:
    doc = ROOT / "docs" / "configuration.md"
    assert doc.is_file(), "docs/configuration.md is missing; run `python -m align.docgen`"
    assert doc.read_text(encoding="utf-8") == docgen.configuration_reference(), (
        "docs/configuration.md is out of date with align/config.py; run `python -m align.docgen`")


def test_every_config_key_has_a_description() -> None:
    missing = docgen.missing_descriptions()
    assert not missing, ("add a docstring (a string literal on the line after the field) in align/config.py for: "
                         + "; ".join(missing))


def test_reference_lists_every_key_of_every_command_config() -> None:
    commands = docgen.command_configs()
    assert SFTConfig in commands

    def leaves(cls: type, prefix: str = "") -> list[str]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out += leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
        return out

    text = docgen.configuration_reference()
    for cls in commands:
        for key in leaves(cls):
            assert f"| `{key}` |" in text, f"{cls.__name__}: key '{key}' missing from the reference"


def test_attribute_docstrings_are_read_from_the_source() -> None:
    docs = docgen.attribute_docstrings(SFTConfig)
    assert docs["output_dir"].startswith("Run directory")
    rows = {k.name: k for s in docgen.sections(SFTConfig) for k in s.keys}
    assert rows["train.lr"].default == "2e-05" and rows["train.lr"].type == "float"
    assert rows["model.tokenizer"].type == "str or null" and rows["model.tokenizer"].default == "null"
    assert rows["data.truncation"].type == "one of `drop`, `truncate`, `error`"


@pytest.mark.parametrize("recipe", ["sft_tiny.yaml", "sft_tiny_lora.yaml"])
def test_sft_recipes_load(recipe: str) -> None:
    cfg = load_config(SFTConfig, ROOT / "recipes" / recipe)
    assert cfg.model.path == "runs/tiny"
    assert cfg.data.train == "runs/data/sft_train.jsonl"
    assert cfg.lora.enabled == (recipe == "sft_tiny_lora.yaml")
