"""Synthetic tasks that generate a recipe's data from a seed.

A task is a module with `build(out_dir, seed, **sizes) -> dict[str, Path]`, writing its splits
as JSONL, and `gold_reward(prompts, responses) -> list[float]`, the exact reward used by
evaluation only. Add a task by writing such a module and registering its `build` in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from align.tasks import addition

TASKS: dict[str, Callable[..., dict[str, Path]]] = {"addition": addition.build}


def get_task(name: str) -> Callable[..., dict[str, Path]]:
    """The `build` function of the task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
