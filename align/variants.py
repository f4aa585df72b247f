"""The `sft_variants` stage: several SFT runs in one recipe, each the recipe's `sft` section with
some keys changed, so that data strategies (raw, distilled, rejection-sampled, curated, more raw
data) or full fine-tuning against LoRA are compared on one eval, seed by seed.

A recipe's section maps a variant's name to the keys it changes:

    sft_variants:
      raw_4x:    {data: {max_samples: 8000}}
      distilled: {data: {train: "{data}/sft_teacher.jsonl"}}
      lora:      {lora: {enabled: true, target: all}}

Each variant is the `sft` section (without its `output_dir`) deep-merged with its keys (a nested
section merges key by key; any other value replaces), wired like the `sft` stage (the initial
model, the task's data, the recipe's seed and prompt template, unless the variant sets them), and
written to `<root>/sft_variants/<name>/`, a run directory like any SFT run. Variants train one
after another; a complete one is skipped and an interrupted one resumed, as the pipeline does for
stages. `summary.json` (written last, its presence marks the stage complete) holds every variant's
numeric summary keys as `<name>/<key>` (`raw_4x/wall_time_sec`), so `--check` can test them.
`align eval` names a variant `sft-<name>` beside `sft`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from align.config import ConfigError, SFTConfig
from align.rundir import RunDir, write_summary

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def eval_name(variant: str) -> str:
    """The display name of a variant in `align eval` and the reports."""
    return f"sft-{variant}"


def check_name(name: Any) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"recipe key 'sft_variants.{name}': a variant's name must be letters, digits, '_', '.' "
                          "or '-' (it names a directory)")


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied: nested mappings merged key by key, any other value replaced.
    Neither argument is modified."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def train_variants(cfg: Any, dry_run: bool = False) -> dict[str, Any]:
    """Train every variant not yet complete (resuming an interrupted one), then write summary.json;
    with `dry_run`, check every variant as `align sft --dry-run` does and return the plan."""
    from align.sft import train_sft

    t0 = time.time()
    variants: dict[str, SFTConfig] = cfg.variants
    if dry_run:
        plan: dict[str, Any] = {"stage": "sft_variants",
                                "status": f"dry run: {len(variants)} SFT variants checked; nothing trained"}
        for name, v in variants.items():
            run = RunDir(Path(v.output_dir))
            if run.is_complete():
                plan[name] = "complete, skipped"
                continue
            sub = train_sft(v, resume=run.has_checkpoints(), dry_run=True)
            plan[name] = f"{sub.get('steps', '?')} steps" + (" (resumed)" if run.has_checkpoints() else "")
        return plan
    summary: dict[str, Any] = {"stage": "sft_variants", "variants": list(variants)}
    for name, v in variants.items():
        run = RunDir(Path(v.output_dir))
        if run.is_complete():
            print(f"run: sft_variants: {name} complete, skipped ({run.root})", flush=True)
        else:
            resume = run.has_checkpoints()
            print(f"run: sft_variants: {name}{' (resuming)' if resume else ''} -> {run.root}", flush=True)
            train_sft(v, resume=resume)
        for key, value in run.read_summary().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                summary[f"{name}/{key}"] = value
    summary["wall_time_sec"] = time.time() - t0
    write_summary(RunDir(Path(cfg.output_dir)), summary)
    return summary


def check_inputs(cfg: Any, ready: Callable[..., bool]) -> None:
    """Each variant's data that already exists, checked line by line (as the sft stage's)."""
    from align.sft import read_sft_records

    for v in cfg.variants.values():
        if ready(v.data.train, v.data.validation):
            read_sft_records(v)
