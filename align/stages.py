"""The stage registry: every stage of the pipeline, declared once.

A stage is a name, its config class, the function that runs it, the subdirectory of a recipe's
root it writes, what it reads from earlier stages, and whether it is a method compared against
SFT. `align/cli.py` builds a command per training stage from this table and `align/pipeline.py`
wires and runs recipes from it; nothing finds a stage by its name in any other way. The order of
`STAGES` is the order a recipe runs in.

Adding a stage: write its module (one file, `train_<x>(cfg, resume, force, dry_run) -> summary`,
and optionally `check_inputs(cfg, ready)`), add its config class to align/config.py, and add one
entry below (docs/contributing.md).

This module imports no torch: the training functions are reached through small wrappers that
import their module when called, so `align --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from align import config as C


@dataclass(frozen=True)
class Input:
    """A config key a stage's section leaves unset, filled from an earlier stage's output."""

    key: str
    """The dotted config key, e.g. `model.path`."""
    stage: str
    """The stage whose output directory fills it (only when that stage is in the recipe)."""
    file: str = ""
    """A file inside that output (the task's data files); empty: the directory itself."""
    unless: str | None = None
    """Leave the key alone when this other key is set (`reward.model` unless `reward.function`)."""


@dataclass(frozen=True)
class Stage:
    name: str
    config: type | None
    """The typed config of its section (None: a free-form section, the task's parameters)."""
    run: Callable[..., Any]
    """Runs the stage: training stages take (cfg, resume, force, dry_run) and return the summary."""
    help: str
    output: str
    """Subdirectory of the recipe's root it writes."""
    inputs: tuple[Input, ...] = ()
    method: bool = False
    """A method that starts from SFT and is compared against it (eval names it `sft+<name>`)."""
    training: bool = True
    """Trains a model into a run directory (and gets its own `align <name>` command)."""
    budget_key: str | None = None
    """The key `budget_episodes` sets (responses sampled); DPO's is computed (`dpo_budget`)."""
    check_inputs: Callable[[Any, Callable[..., bool]], None] | None = None
    """Checks what the stage reads that already exists, while an earlier stage is pending."""


# ----------------------------------------------------------------------------------------------
# The functions each stage runs (imported when called)


def _task(cfg: dict[str, Any], out: Any) -> Any:
    from align.errors import AlignError
    from align.tasks import get_task

    params = {k: v for k, v in cfg.items() if k not in ("name", "seed")}
    try:
        return get_task(cfg["name"])(out, seed=cfg["seed"], **params)
    except (TypeError, ValueError) as e:
        raise AlignError(f"recipe section 'task': {e}") from None


def _init_model(cfg: C.InitModelConfig, out: Any) -> Any:
    from align.modeling import init_tiny_model

    return init_tiny_model(out, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                           max_position=cfg.max_position, vocab_size=cfg.vocab_size, seed=cfg.seed)


def _sft(cfg: C.SFTConfig, **kw: Any) -> dict[str, Any]:
    from align.sft import train_sft

    return train_sft(cfg, **kw)


def _sft_inputs(cfg: C.SFTConfig, ready: Callable[..., bool]) -> None:
    from align.sft import read_sft_records

    if ready(cfg.data.train, cfg.data.validation):
        read_sft_records(cfg)


def _rm(cfg: C.RMConfig, **kw: Any) -> dict[str, Any]:
    from align.rm import train_rm

    return train_rm(cfg, **kw)


def _rm_inputs(cfg: C.RMConfig, ready: Callable[..., bool]) -> None:
    from align.rm import read_pair_records

    if ready(cfg.data.train, cfg.data.validation, cfg.normalize_with):
        read_pair_records(cfg)


def _online(cfg: C.RLConfig, **kw: Any) -> dict[str, Any]:
    from align.ppo import train_ppo

    return train_ppo(cfg, **kw)


def _online_inputs(cfg: C.RLConfig, ready: Callable[..., bool]) -> None:
    from align.ppo import check_inputs

    check_inputs(cfg, ready)


def _dpo(cfg: C.DPOStageConfig, **kw: Any) -> dict[str, Any]:
    from align.dpo import train_dpo

    return train_dpo(cfg, **kw)


def _dpo_inputs(cfg: C.DPOStageConfig, ready: Callable[..., bool]) -> None:
    from align.dpo import read_pairs

    for source, split in ((cfg.data.train, cfg.data.split), (cfg.data.validation, cfg.data.validation_split)):
        if source and ready(source):
            read_pairs(source, cfg, split)


def _sample(cfg: C.SampleConfig, dry_run: bool = False) -> dict[str, Any]:
    """Best-of-K samples into `cfg.out`, then summary.json beside it (written last: complete)."""
    from pathlib import Path

    from align import data as D
    from align.best_of_n import run_sample
    from align.rundir import RunDir, write_summary

    if dry_run:
        records, _ = D.read_prompt_records(cfg.prompts, max_samples=cfg.max_samples)
        return {"stage": "sample", "status": "dry run: prompts checked; nothing sampled",
                "prompts": len(records), "best_of": cfg.best_of, "out": cfg.out}
    out = Path(cfg.out)
    out.unlink(missing_ok=True)  # left by a run cut short before its summary: this stage is not complete
    summary = run_sample(cfg)
    write_summary(RunDir(out.parent), {"stage": "sample", **summary})
    return summary


def _sample_inputs(cfg: C.SampleConfig, ready: Callable[..., bool]) -> None:
    from align import data as D

    if ready(cfg.prompts):
        D.read_prompt_records(cfg.prompts, max_samples=cfg.max_samples)


def _curate(cfg: C.CurateConfig, dry_run: bool = False) -> dict[str, Any]:
    """`align curate` with its report as the stage's summary.json (written last: complete)."""
    from pathlib import Path

    from align import data as D
    from align.curate import curate

    if dry_run:
        records = D.read_records(cfg.data)
        return {"stage": "curate", "status": "dry run: data read; nothing written", "records": len(records),
                "out": cfg.out}
    Path(cfg.out).unlink(missing_ok=True)  # left by a run cut short before its report
    return curate(cfg)


def _curate_inputs(cfg: C.CurateConfig, ready: Callable[..., bool]) -> None:
    from align import data as D

    if ready(cfg.data):
        D.read_records(cfg.data)


def _sft_variants(cfg: C.SFTVariantsConfig, dry_run: bool = False) -> dict[str, Any]:
    from align.variants import train_variants

    return train_variants(cfg, dry_run=dry_run)


def _sft_variants_inputs(cfg: C.SFTVariantsConfig, ready: Callable[..., bool]) -> None:
    from align.variants import check_inputs

    check_inputs(cfg, ready)


def _eval(cfg: C.EvalConfig, **kw: Any) -> dict[str, Any]:
    from align.evaluate import evaluate_models

    return evaluate_models(cfg, **kw)


def _eval_inputs(cfg: C.EvalConfig, ready: Callable[..., bool]) -> None:
    from align import data as D
    from align.reward import load_reward_function

    if ready(cfg.prompts):
        D.read_prompt_records(cfg.prompts)
    for key in ("reward_function", "gold_reward"):
        if getattr(cfg, key):
            load_reward_function(getattr(cfg, key), key)


# ----------------------------------------------------------------------------------------------
# The table

_SFT_DATA = (Input("data.train", "task", "sft_train.jsonl"), Input("data.validation", "task", "sft_val.jsonl"))
_PAIRS = (Input("data.train", "task", "pref_train.jsonl"), Input("data.validation", "task", "pref_val.jsonl"))
_FROM_SFT = (Input("model.path", "sft"),)
_RL_INPUTS = (*_FROM_SFT, Input("reward.model", "rm", unless="reward.function"),
              Input("data.train", "task", "prompts.jsonl"), Input("eval.prompts", "task", "eval.jsonl"))


def _rl(name: str, config: type, help: str) -> Stage:
    return Stage(name, config, _online, help, name, _RL_INPUTS, method=True, budget_key="ppo.total_episodes",
                 check_inputs=_online_inputs)


STAGES: tuple[Stage, ...] = (
    Stage("task", None, _task, "Generate a task's data (SFT demos, preference pairs, prompts, eval set).", "data",
          training=False),
    Stage("init_model", C.InitModelConfig, _init_model, "Build a tiny Llama-style model and tokenizer.", "init",
          training=False),
    Stage("sft", C.SFTConfig, _sft, "Supervised fine-tuning (masked NLL on response tokens) from a YAML CONFIG.",
          "sft", (Input("model.path", "init_model"), *_SFT_DATA), check_inputs=_sft_inputs),
    Stage("rm", C.RMConfig, _rm, "Train a reward model on preference pairs (Bradley-Terry) from a YAML CONFIG.",
          "rm", (*_FROM_SFT, *_PAIRS), check_inputs=_rm_inputs),
    # Data for SFT variants: best-of-K samples of the SFT model, and curated data; then the variants.
    # Each writes its files under its own directory (`out`, `report` wired there) and summary.json last.
    Stage("sample", C.SampleConfig, _sample, "Best-of-K rejection sampling from the SFT model, scored by the reward.",
          "sample", (Input("model", "sft"), Input("reward_model", "rm", unless="reward_function"),
                     Input("prompts", "task", "sft_train.jsonl"), Input("out", "sample", "samples.jsonl")),
          training=False, check_inputs=_sample_inputs),
    Stage("curate", C.CurateConfig, _curate, "SFT data filtered by score, deduplicated and chosen for prompt "
          "diversity (align/curate.py).", "curate",
          (Input("data", "task", "sft_train.jsonl"), Input("reward_model", "rm", unless="score_field"),
           Input("out", "curate", "curated.jsonl"), Input("report", "curate", "summary.json")),
          training=False, check_inputs=_curate_inputs),
    Stage("sft_variants", C.SFTVariantsConfig, _sft_variants, "SFT runs that each change some keys of the sft "
          "section (align/variants.py).", "sft_variants", training=False, check_inputs=_sft_variants_inputs),
    _rl("ppo", C.PPOConfig, "RLHF with PPO (GAE, a trained critic) from an SFT model and a reward, from a YAML CONFIG."),
    Stage("dpo", C.DPOStageConfig, _dpo, "DPO (TRL's DPOTrainer) from an SFT model on preference pairs, from a YAML CONFIG.",
          "dpo", (*_FROM_SFT, *_PAIRS), method=True, check_inputs=_dpo_inputs),
    _rl("grpo", C.GRPOStageConfig, "GRPO (group-normalised advantages, KL in the loss) from a YAML CONFIG."),
    _rl("dr_grpo", C.DrGRPOStageConfig, "Dr GRPO (GRPO without the std division and the length normalisation) "
                                        "from a YAML CONFIG."),
    _rl("rloo", C.RLOOStageConfig, "RLOO (leave-one-out baseline, KL in the reward) from a YAML CONFIG."),
    _rl("reinforce_pp", C.ReinforcePPStageConfig, "REINFORCE++ (batch-whitened returns, no critic) from a YAML CONFIG."),
    _rl("remax", C.ReMaxStageConfig, "ReMax (greedy-response baseline) from a YAML CONFIG."),
    Stage("eval", C.EvalConfig, _eval, "The same held-out prompts through every model of the recipe.", "eval",
          training=False, check_inputs=_eval_inputs),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(BY_NAME)}") from None


def training_stages() -> list[Stage]:
    return [s for s in STAGES if s.training]


def methods() -> list[Stage]:
    return [s for s in STAGES if s.method]


def rl_stages() -> list[Stage]:
    """The online methods of the RL loop (one config family, one reward path)."""
    return [s for s in STAGES if s.run is _online]
