"""Synthetic tasks that generate a recipe's data from a seed.

A task is a module with `build(out_dir, seed, **sizes) -> dict[str, Path]`, writing its splits
as JSONL, and `gold_reward(prompts, responses) -> list[float]`, the exact reward used by
evaluation only. Add a task by writing such a module and registering its `build` in `TASKS`.

`build` writes `task.json` last, recording `task` (its name), `seed`, every keyword parameter of
`build` under its own name, and `counts` (rows per split, one `<split>.jsonl` each). `align task`
reuses an existing directory only when that record matches what it was asked for
(`existing_task`); the pipeline skips a directory holding `task.json` before calling `build`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.tasks import addition

TASKS: dict[str, Callable[..., dict[str, Path]]] = {"addition": addition.build}


def get_task(name: str) -> Callable[..., dict[str, Path]]:
    """The `build` function of the task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def task_params(build: Callable[..., Any], given: dict[str, Any],
                name: Callable[[str], str] = lambda key: key) -> dict[str, Any]:
    """Every parameter `build` would run with: its defaults, overridden by `given`. A key `build`
    does not take, or a value of another type than the default's, is an error naming `name(key)`."""
    defaults = {k: p.default for k, p in inspect.signature(build).parameters.items()
                if k not in ("out_dir", "seed") and p.default is not inspect.Parameter.empty}
    for key, value in given.items():
        if key not in defaults:
            raise AlignError(f"{name(key)}: the task has no parameter '{key}'; known: {', '.join(defaults)}")
        default = defaults[key]
        kinds = (int, float) if isinstance(default, float) else (type(default),)
        wrong = not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool)
        if default is not None and wrong:
            raise AlignError(f"{name(key)} must be {type(default).__name__} like its default ({default!r}), "
                             f"got {value!r}")
    return {**defaults, **given}


def existing_task(out_dir: Path, name: str, seed: int, params: dict[str, Any]) -> str | None:
    """None when `out_dir` holds the complete task `name` built with `seed` and `params`; otherwise
    what differs, in words (for an error message)."""
    meta_path = out_dir / "task.json"
    if not out_dir.is_dir():
        return "it is a file"
    if not meta_path.is_file():
        return "it holds no task.json, so no complete task"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"its {meta_path.name} is not readable JSON"
    if not isinstance(meta, dict):
        return f"its {meta_path.name} is not a task record"
    if meta.get("task") != name:
        return f"it holds task {meta.get('task')!r}, not {name!r}"
    if meta.get("seed") != seed:
        return f"it holds task {name} with seed {meta.get('seed')!r}, not {seed}"
    differs = [f"{k}={meta.get(k)!r} (asked {v!r})" for k, v in params.items() if meta.get(k) != v]
    if differs:
        return f"it holds task {name} built with {', '.join(differs[:3])}" + (" ..." if len(differs) > 3 else "")
    counts = meta.get("counts") if isinstance(meta.get("counts"), dict) else {}
    lost = [split for split in counts if not (out_dir / f"{split}.jsonl").is_file()]
    if lost:
        return f"it holds task {name}, but its split {lost[0]}.jsonl is missing"
    return None
