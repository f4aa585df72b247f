"""`align run RECIPE`: every stage of a recipe, in order, each reading the previous one's output.

A recipe is one YAML file: shared keys (`output_root`, `seed`, `prompt_template`) and a section
per stage, in this order (each optional):

    task        generate the task's data into <root>/data           (align task)
    init_model  build a tiny model into <root>/init                 (align init-model)
    sft         <root>/sft                                          (align sft)
    rm          <root>/rm                                           (align rm)
    ppo         <root>/ppo                                          (align ppo)
    dpo         <root>/dpo                                          (align dpo)
    grpo        <root>/grpo                                         (align grpo)
    rloo        <root>/rloo                                         (align rloo)
    eval        <root>/eval, then the comparison report in <root>/report

Stage sections hold the keys of that command's config; what a section leaves out is wired from
the shared keys and the earlier stages (output_dir, seed, model paths, the reward model, the
prompt template, data files of the task). Strings may use `{root}` and `{data}`.

Every config is built and validated before the first stage runs. A stage whose output is
complete is skipped (its completion marker is written last, atomically); an interrupted stage
resumes from its last checkpoint; `--from STAGE` deletes that stage's output and everything after
it, and reruns them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.config import (ConfigError, DPOStageConfig, EvalConfig, GRPOStageConfig, PPOConfig, RLOOStageConfig,
                          RMConfig, SFTConfig, check_type, from_dict, parse_override, read_yaml, set_dotted)
from align.errors import AlignError
from align.runtime import RunDir, atomic_write_text

STAGES = ("task", "init_model", "sft", "rm", "ppo", "dpo", "grpo", "rloo", "eval")
METHODS = ("ppo", "dpo", "grpo", "rloo")
"""The stages that start from SFT and are compared against it (eval names them `sft+<stage>`)."""
BUDGET_KEYS = {"ppo": "ppo.total_episodes", "grpo": "rl.total_episodes", "rloo": "rl.total_episodes"}


@dataclass
class Recipe:
    """A whole pipeline: shared keys plus one section per stage."""

    output_root: str = ""
    """Directory every stage writes under. Required."""
    seed: int = 42
    """Seed of every stage (a stage section may override it)."""
    prompt_template: str = "{prompt}"
    """Prompt template of every stage: the policy must see prompts as it was trained on them."""
    task: dict[str, Any] | None = None
    """`{name: addition, seed?, <size>: N, ...}`: generate the task's data into <root>/data."""
    init_model: dict[str, Any] | None = None
    """`{hidden, layers, heads, max_position, vocab_size, seed}`: build a tiny model into <root>/init."""
    sft: dict[str, Any] | None = None
    rm: dict[str, Any] | None = None
    ppo: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    """`align dpo` from the SFT model on the task's preference pairs."""
    grpo: dict[str, Any] | None = None
    """`align grpo` from the SFT model with PPO's prompts and reward."""
    rloo: dict[str, Any] | None = None
    """`align rloo` from the SFT model with PPO's prompts and reward."""
    eval: dict[str, Any] | None = None
    budget_episodes: int | None = None
    """The same budget for every method: responses sampled by PPO, GRPO and RLOO (their
    `total_episodes`), and preference pairs trained on by DPO (its `train.max_steps` x batch)."""
    description: str = ""
    """Free text shown in the report."""


@dataclass
class Plan:
    """The resolved recipe: each present stage's typed config (or dict for task/init_model)."""

    recipe: Recipe
    root: Path
    stages: dict[str, Any] = field(default_factory=dict)


def _subst(value: Any, root: Path) -> Any:
    """Replace `{root}` and `{data}` in strings (only those two names; other braces stay)."""
    if isinstance(value, str):
        return value.replace("{root}", str(root)).replace("{data}", str(root / "data"))
    if isinstance(value, dict):
        return {k: _subst(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, root) for v in value]
    return value


def _default(section: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in `section` unless the recipe already gave it a value."""
    node = section
    *parents, last = dotted.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return  # a wrong type: left for the config check to report
    if node.get(last) is None:
        node[last] = value


def load_recipe(path: str, overrides: tuple[str, ...] = ()) -> Plan:
    """Read a recipe, wire the stages together and validate every stage's config."""
    data = read_yaml(path)
    for item in overrides:
        set_dotted(data, *parse_override(item))
    recipe = from_dict(Recipe, data)
    if not recipe.output_root:
        raise ConfigError("missing required recipe key 'output_root'")
    root = Path(recipe.output_root)
    plan = Plan(recipe, root)
    present = [s for s in STAGES if getattr(recipe, s) is not None]
    if not present:
        raise ConfigError(f"recipe '{path}' has no stage section (one of {', '.join(STAGES)})")
    data_dir = root / "data"

    if recipe.task is not None:
        task = dict(_subst(recipe.task, root))
        if "name" not in task:
            raise ConfigError("missing required recipe key 'task.name'")
        task.setdefault("seed", recipe.seed)
        from align.tasks import get_task

        try:
            get_task(task["name"])
        except ValueError as e:
            raise ConfigError(f"recipe key 'task.name': {e}") from None
        plan.stages["task"] = task
    if recipe.init_model is not None:
        init = dict(_subst(recipe.init_model, root))
        known = {"hidden", "layers", "heads", "max_position", "vocab_size", "seed"}
        for key in init:
            if key not in known:
                raise ConfigError(f"unknown recipe key 'init_model.{key}'; valid keys: {', '.join(sorted(known))}")
            check_type(f"init_model.{key}", init[key], int)
        plan.stages["init_model"] = init

    task_files = recipe.task is not None
    model_src = str(root / "init") if recipe.init_model is not None else None
    stage_classes = (("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig), ("dpo", DPOStageConfig),
                     ("grpo", GRPOStageConfig), ("rloo", RLOOStageConfig))
    for name, cls in stage_classes:
        section = getattr(recipe, name)
        if section is None:
            continue
        section = _subst(copy.deepcopy(section), root)
        _default(section, "output_dir", str(root / name))
        _default(section, "seed", recipe.seed)
        _default(section, "data.prompt_template", recipe.prompt_template)
        if name == "sft":
            if model_src:
                _default(section, "model.path", model_src)
            if task_files:
                _default(section, "data.train", str(data_dir / "sft_train.jsonl"))
                _default(section, "data.validation", str(data_dir / "sft_val.jsonl"))
        if name != "sft" and recipe.sft is not None:
            _default(section, "model.path", str(root / "sft"))
        if name in ("rm", "dpo") and task_files:
            _default(section, "data.train", str(data_dir / "pref_train.jsonl"))
            _default(section, "data.validation", str(data_dir / "pref_val.jsonl"))
        if name in ("ppo", "grpo", "rloo"):
            reward = section.setdefault("reward", {})
            if recipe.rm is not None and not reward.get("function"):
                reward.setdefault("model", str(root / "rm"))
            if task_files:
                _default(section, "data.train", str(data_dir / "prompts.jsonl"))
        if name == "ppo" and task_files:
            _default(section, "eval.prompts", str(data_dir / "eval.jsonl"))
        if recipe.budget_episodes is not None and name in BUDGET_KEYS:
            _set_budget(section, name, BUDGET_KEYS[name], recipe.budget_episodes)
        if recipe.budget_episodes is not None and name == "dpo":  # pairs: max_steps x the (typed) global batch
            t = _typed(cls, copy.deepcopy(section), name).train
            steps = max(1, recipe.budget_episodes // (t.batch_size * t.grad_accum))
            _set_budget(section, name, "train.max_steps", steps)
        plan.stages[name] = _typed(cls, section, name)

    if recipe.eval is not None:
        section = _subst(copy.deepcopy(recipe.eval), root)
        _default(section, "output_dir", str(root / "eval"))
        _default(section, "seed", recipe.seed)
        _default(section, "prompt_template", recipe.prompt_template)
        if not section.get("models"):
            stages = [n for n in ("sft", *METHODS) if getattr(recipe, n) is not None]
            section["models"] = [str(root / n) for n in stages]
            section.setdefault("names", [f"sft+{n}" if n in METHODS and recipe.sft is not None else n
                                         for n in stages])
        if recipe.sft is not None:
            _default(section, "reference", str(root / "sft"))
            sft_val = plan.stages["sft"].data.validation
            if sft_val:
                _default(section, "validation", sft_val)
        rl = next((plan.stages[n] for n in ("ppo", "grpo", "rloo") if n in plan.stages), None)
        if rl is not None:
            if rl.reward.model:
                _default(section, "reward_model", rl.reward.model)
            elif rl.reward.function:
                _default(section, "reward_function", rl.reward.function)
            loop = rl.ppo if hasattr(rl, "ppo") else rl.rl
            _default(section, "response_length", loop.response_length)
        ppo = plan.stages.get("ppo")
        if ppo is not None:
            if ppo.eval.prompts:
                _default(section, "prompts", ppo.eval.prompts)
            if ppo.eval.gold_reward:
                _default(section, "gold_reward", ppo.eval.gold_reward)
        plan.stages["eval"] = _typed(EvalConfig, section, "eval")
    return plan


def _set_budget(section: dict[str, Any], name: str, dotted: str, value: int) -> None:
    """Set a stage's budget from `budget_episodes`; a different value in the section is an error."""
    node = section
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or node.get(part) is None else {}
    if node.get(last) is not None and node[last] != value:
        raise ConfigError(f"recipe key '{name}.{dotted}' ({node[last]}) contradicts 'budget_episodes' "
                          f"(which sets it to {value}); remove one of them")
    node[last] = value


def _typed(cls: type, section: dict[str, Any], name: str) -> Any:
    """Build and validate a stage config, naming keys as `stage.key` in errors."""
    try:
        cfg = from_dict(cls, section, prefix=f"{name}.")
        cfg.validate()
    except ConfigError as e:
        msg = str(e)
        # validate() names keys without the stage prefix: add it, so the recipe key can be found.
        if f"key '{name}." not in msg:
            msg = msg.replace("key '", f"key '{name}.", 1)
        raise ConfigError(msg) from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Running


def stage_output(plan: Plan, stage: str) -> Path:
    cfg = plan.stages[stage]
    if stage == "task":
        return plan.root / "data"
    if stage == "init_model":
        return plan.root / "init"
    return Path(cfg.output_dir)


def is_complete(plan: Plan, stage: str) -> bool:
    out = stage_output(plan, stage)
    if stage == "task":
        return (out / "task.json").is_file()
    if stage == "init_model":
        return (out / "config.json").is_file()
    if stage == "eval":
        return (out / "results.json").is_file()
    return RunDir(out).is_complete()


def run_stage(plan: Plan, stage: str) -> None:
    cfg = plan.stages[stage]
    out = stage_output(plan, stage)
    if stage == "task":
        from align.tasks import get_task

        params = {k: v for k, v in cfg.items() if k not in ("name", "seed")}
        try:
            get_task(cfg["name"])(out, seed=cfg["seed"], **params)
        except (TypeError, ValueError) as e:
            raise AlignError(f"recipe section 'task': {e}") from None
    elif stage == "init_model":
        from align.modeling import init_tiny_model

        if out.exists():
            shutil.rmtree(out)  # a directory without config.json is a build cut short
        init_tiny_model(out, **cfg)
    elif stage == "eval":
        from align.evaluate import evaluate_models

        evaluate_models(cfg)
    else:
        # Every training stage lives in align/<stage>.py as train_<stage>(cfg, resume=...).
        resume = RunDir(out).latest_checkpoint() is not None
        if resume:
            print(f"run: {stage}: resuming the interrupted run in {out}", flush=True)
        getattr(importlib.import_module(f"align.{stage}"), f"train_{stage}")(cfg, resume=resume)


def check_recipe(plan: Plan, from_stage: str | None = None) -> list[dict[str, Any]]:
    """Check every stage that would run, as its command's `--dry-run` does; return their plans.
    Nothing is written.

    A stage that reads the output of an earlier stage that has not run yet cannot be checked in
    full (its model or data do not exist yet): it is reported as `inputs produced by <stage>`, and
    what it reads that already exists (data files, line by line; reward function imports) is checked.
    """
    order = [s for s in STAGES if s in plan.stages]
    if from_stage is not None and from_stage not in order:
        raise AlignError(f"--from {from_stage}: the recipe's stages are {', '.join(order)}")
    rerun = order[order.index(from_stage):] if from_stage else []
    pending: list[str] = []
    plans = []
    for stage in order:
        cfg, out = plan.stages[stage], stage_output(plan, stage)
        if stage not in rerun and is_complete(plan, stage):
            plans.append({"stage": stage, "status": f"complete, skipped ({out})"})
            continue
        producers = [p for p in pending if _reads(cfg, stage_output(plan, p))]
        pending.append(stage)
        try:
            if producers:
                _check_available_inputs(stage, cfg, [stage_output(plan, p) for p in producers])
                plans.append({"stage": stage, "status": f"inputs produced by {', '.join(producers)}",
                              "output_dir": str(out)})
            else:
                plans.append(_dry_run(stage, cfg, out, rerun=stage in rerun))
        except AlignError as e:
            raise AlignError(f"stage {stage}: {e}") from None
    return plans


def _paths(value: Any) -> list[str]:
    """Every string in a stage config but its own output_dir."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for k, v in value.items() if k != "output_dir" for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return []


def _under(path: str, out: Path) -> bool:
    p = Path(path).expanduser().absolute()
    return p == out.absolute() or out.absolute() in p.parents


def _reads(cfg: Any, out: Path) -> bool:
    """Whether a stage config names a path at or under `out` (another stage's output)."""
    return any(_under(s, out) for s in _paths(cfg if isinstance(cfg, dict) else _asdict(cfg)))


def _check_available_inputs(stage: str, cfg: Any, produced: list[Path]) -> None:
    """Check what a stage reads that no pending stage produces: data files, every line; reward imports."""
    from align import data as D
    from align.bundle import load_reward_function

    def ready(*paths: str | None) -> bool:
        return all(p is None or not any(_under(p, out) for out in produced) for p in paths)

    if stage == "sft" and ready(cfg.data.train, cfg.data.validation):
        from align.sft import read_sft_records

        read_sft_records(cfg)
    elif stage == "rm" and ready(cfg.data.train, cfg.data.validation, cfg.normalize_with):
        from align.rm import read_pair_records

        read_pair_records(cfg)
    elif stage == "dpo" and ready(cfg.data.train, cfg.data.validation):
        from align.dpo import read_pairs

        for source in (cfg.data.train, cfg.data.validation):
            if source:
                read_pairs(source, cfg)
    elif stage in ("grpo", "rloo"):
        if ready(cfg.data.train):
            D.read_prompt_records(cfg.data.train, cfg.data.format, cfg.data.split)
        if cfg.reward.function:
            load_reward_function(cfg.reward.function, "reward.function")
    elif stage in ("ppo", "eval"):
        ppo = stage == "ppo"
        sources = [(cfg.data.train, cfg.data.split), (cfg.eval.prompts, "train")] if ppo else [(cfg.prompts, "train")]
        for source, split in sources:
            if source and ready(source):
                D.read_prompt_records(source, cfg.data.format if ppo else "auto", split)
        functions = ({"reward.function": cfg.reward.function, "eval.gold_reward": cfg.eval.gold_reward} if ppo else
                     {"reward_function": cfg.reward_function, "gold_reward": cfg.gold_reward})
        for key, spec in functions.items():
            if spec:
                load_reward_function(spec, key)


def _dry_run(stage: str, cfg: Any, out: Path, rerun: bool) -> dict[str, Any]:
    """The `--dry-run` plan of one stage whose inputs all exist."""
    if stage in ("task", "init_model"):
        return {"stage": stage, "status": "settings checked; nothing to read", "output_dir": str(out), **cfg}
    resume = not rerun and RunDir(out).latest_checkpoint() is not None
    if stage == "eval":
        from align.evaluate import evaluate_models

        plan = evaluate_models(cfg, dry_run=True)
    else:
        if rerun and out.exists():  # --from deletes this output first: check the run as if it were gone
            cfg = dataclasses.replace(cfg, output_dir=str(out.with_name(f".{out.name}.rerun")))
        plan = getattr(importlib.import_module(f"align.{stage}"), f"train_{stage}")(cfg, resume=resume, dry_run=True)
    return {**plan, "output_dir": str(out) + (" (resumed)" if resume else " (deleted and rerun)" if rerun else "")}


def run_recipe(path: str, overrides: tuple[str, ...] = (), from_stage: str | None = None) -> Plan:
    """Run every stage of the recipe at `path` that is not complete yet; then the report. Every
    stage's inputs are checked first (`check_recipe`), so a bad file of a late stage is reported
    before the early stages spend their compute."""
    plan = load_recipe(path, overrides)
    order = [s for s in STAGES if s in plan.stages]
    if from_stage is not None:
        if from_stage not in order:
            raise AlignError(f"--from {from_stage}: the recipe's stages are {', '.join(order)}")
        for stage in order[order.index(from_stage):]:
            out = stage_output(plan, stage)
            if out.exists():
                shutil.rmtree(out)
    check_recipe(plan)
    plan.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.root / "recipe.yaml", yaml.safe_dump(
        {"recipe": str(path), "overrides": list(overrides), "stages": {
            s: (c if isinstance(c, dict) else _asdict(c)) for s, c in plan.stages.items()}}, sort_keys=False))
    t0 = time.time()
    for k, stage in enumerate(order, 1):
        header = f"run: stage {k} of {len(order)}: {stage}"
        if is_complete(plan, stage):
            print(f"{header}: complete, skipped ({stage_output(plan, stage)})", flush=True)
            continue
        print(f"{header} -> {stage_output(plan, stage)}", flush=True)
        t_stage = time.time()
        run_stage(plan, stage)
        print(f"run: {stage} done in {time.time() - t_stage:.1f}s", flush=True)
    if "eval" in plan.stages:
        from align.compare import compare

        report = compare([str(stage_output(plan, "eval"))], str(plan.root / "report"))
        print(report["table"]["text"], flush=True)
        print(f"run: report in {plan.root / 'report'} (report.md, report.html)", flush=True)
    print(f"run: all stages complete in {time.time() - t0:.1f}s", flush=True)
    return plan


def _asdict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
