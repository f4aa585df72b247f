"""What a run directory says about the model in it: its `config.yaml` and `summary.json`, read by
`align generate` (the prompt template), `align eval` (defaults and the compute lineage) and
`align compare`.

These files were written by align, but a person may have edited, cut or copied them since: every
read is strict and a damaged file is a one-line error naming it (and the key at fault), never a
traceback. Imports no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.yaml_io import read_yaml_file


def read_run_config(path: Path, fix: str = "repair it or restore it from the run's recipe") -> dict[str, Any]:
    """A run's `config.yaml` as a mapping; a damaged one is an error naming the file, ending in `fix`."""
    try:
        data = read_yaml_file(path)
    except AlignError as e:
        raise AlignError(f"{e}; {fix}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignError(f"{path}: not a mapping of config keys (a damaged run config); {fix}")
    return data


def config_value(cfg: dict[str, Any], path: Path, key: str, kind: type | tuple[type, ...] = str,
                 required: bool = False, fix: str = "repair it or restore it from the run's recipe") -> Any:
    """The dotted `key` of a run config read from `path`: None when absent (an error if `required`),
    else of type `kind`, or an error naming the file and the key."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:
            break
        if not isinstance(node, dict):
            raise AlignError(f"{path}: key '{'.'.join(parts[:i])}' must be a section, got {type(node).__name__}; {fix}")
        node = node.get(part)
    if node is None:
        if required:
            raise AlignError(f"{path}: key '{key}' is missing (a damaged run config); {fix}")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(node, kinds) or (isinstance(node, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise AlignError(f"{path}: key '{key}' must be {names}, got {type(node).__name__}; {fix}")
    return node


def run_prompt_template(model_path: str) -> str | None:
    """The prompt template recorded in a run directory's config.yaml (for `<run>` or `<run>/model`);
    None when there is no run config or it records none."""
    p = Path(model_path)
    cfg_path = p / "config.yaml" if (p / "config.yaml").is_file() else p.parent / "config.yaml"
    if not (cfg_path.is_file() and (cfg_path.parent == p or p.name == "model")):
        return None
    fix = "repair it, or give the template with --template"
    return config_value(read_run_config(cfg_path, fix), cfg_path, "data.prompt_template", str, fix=fix)


def read_summary(path: Path) -> dict[str, Any]:
    """A run's `summary.json` as a mapping; a damaged one is an error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AlignError(f"{path}: not a readable summary ({_first_line(e)}); the run may have been cut short "
                         "while writing it: rerun the stage") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: not a summary (expected a JSON object, got {type(data).__name__}); rerun the stage")
    return data


def summary_number(summary: dict[str, Any], path: Path, *keys: str) -> float:
    """The first of `keys` the summary holds, as a number; 0 when none does or it is null (a
    non-finite value written as null); an error naming the file and key when it is not a number."""
    for key in keys:
        value = summary.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AlignError(f"{path}: key '{key}' must be a number, got {type(value).__name__}; rerun the stage")
        return value if math.isfinite(value) else 0
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
