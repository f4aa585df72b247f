"""`align run RECIPE`: every stage of a recipe, in order, each reading the previous one's output.

A recipe is one YAML file: shared keys (`output_root`, `seed`, `prompt_template`, ...) and a
section per stage, named and ordered as in the stage registry (align/stages.py): task,
init_model, sft, rm, sample, curate, sft_variants, ppo, dpo, grpo, dr_grpo, rloo, reinforce_pp, remax,
eval (each optional). Each stage writes `<root>/<its output>`. `sft_variants` maps names to the
keys each variant changes in the `sft` section (align/variants.py).

Stage sections hold the keys of that command's config; what a section leaves out is wired from
the shared keys and the earlier stages, as each stage's registry entry declares (`inputs`):
output_dir, seed, the model paths, the reward model, the prompt template, the task's data files.
Strings may use `{root}` and `{data}`.

Every config is built and validated before the first stage runs. A stage whose output is
complete is skipped (its completion marker is written last, atomically); an interrupted stage
resumes from its last checkpoint; `--from STAGE` deletes that stage's output and everything after
it, and reruns them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align import stages as S
from align.config import ConfigError, build_config, from_dict, parse_override, read_yaml, set_dotted, suggestion
from align.errors import AlignError
from align.rundir import RunDir, atomic_write_text, release_locks


@dataclass
class Recipe:
    """The keys a recipe shares across its stages (every other top-level key is a stage section)."""

    output_root: str = ""
    """Directory every stage writes under. Required."""
    seed: int = 42
    """Seed of every stage (a stage section may override it)."""
    prompt_template: str = "{prompt}"
    """Prompt template of every stage: the policy must see prompts as it was trained on them."""
    budget_episodes: int | None = None
    """The same budget for every method: responses sampled by each online RL method (its
    `ppo.total_episodes`), and preference pairs trained on by DPO (its `train.max_steps` x batch)."""
    description: str = ""
    """Free text shown in the report."""
    seeds: str | None = None
    """The seeds the recipe's claims are made over, e.g. "0-4": `align run --check` runs them all
    (each under `<root>/seed-N/`) and tests `expect` on them. Plain `align run` runs `seed` alone."""
    expect: list[Any] | None = None
    """Expectations the recipe's results must meet (align/expect.py), checked by `align run --check`."""


@dataclass
class Plan:
    """The resolved recipe: each present stage's typed config (a dict for the task's free-form
    parameters), in registry order."""

    recipe: Recipe
    root: Path
    stages: dict[str, Any] = field(default_factory=dict)

    def output(self, stage: str) -> Path:
        cfg = self.stages[stage]
        return Path(cfg.output_dir) if hasattr(cfg, "output_dir") else self.root / S.get_stage(stage).output

    def is_complete(self, stage: str) -> bool:
        out = self.output(stage)
        if stage == "task":
            return (out / "task.json").is_file()
        if stage == "init_model":
            return (out / "config.json").is_file()
        if stage == "eval":
            return (out / "results.json").is_file()
        return RunDir(out).is_complete()


def _subst(value: Any, root: Path) -> Any:
    """Replace `{root}` and `{data}` in strings (only those two names; other braces stay)."""
    if isinstance(value, str):
        return value.replace("{root}", str(root)).replace("{data}", str(root / "data"))
    if isinstance(value, dict):
        return {k: _subst(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, root) for v in value]
    return value


def _get(section: dict[str, Any], dotted: str) -> Any:
    node: Any = section
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


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
    shared = {k: v for k, v in data.items() if k not in S.BY_NAME}
    for key in shared:
        if key not in {f.name for f in dataclasses.fields(Recipe)}:
            names = [*S.BY_NAME, *(f.name for f in dataclasses.fields(Recipe))]
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else suggestion(Recipe, str(key), "")
            raise ConfigError(f"unknown config key '{key}'{hint}")
    recipe = from_dict(Recipe, shared)
    if not recipe.output_root:
        raise ConfigError("missing required recipe key 'output_root'")
    if recipe.expect is not None:
        from align.expect import parse_expectations

        parse_expectations(recipe.expect, f"recipe '{path}'")
    if recipe.seeds is not None:
        _seed_list(recipe.seeds, "recipe key 'seeds'")
    root = Path(recipe.output_root)
    plan = Plan(recipe, root)
    present = [s.name for s in S.STAGES if data.get(s.name) is not None]
    if not present:
        raise ConfigError(f"recipe '{path}' has no stage section (one of {', '.join(S.BY_NAME)})")
    for name in present:
        if not isinstance(data[name], dict):
            raise ConfigError(f"recipe key '{name}' must be a section (a mapping)")

    for name in present:
        stage = S.get_stage(name)
        section = _subst(copy.deepcopy(data[name]), root)
        if name == "task":
            plan.stages[name] = _task_section(section, recipe)
            continue
        if name == "sft_variants":
            plan.stages[name] = _variants_section(section, _subst(copy.deepcopy(data.get("sft") or {}), root), plan,
                                                  present)
            continue
        if name == "eval":
            _wire_eval(section, plan, present)
        elif name == "init_model":  # the recipe seed seeds the initial weights too
            _default(section, "seed", recipe.seed)
        elif stage.training:
            _default(section, "output_dir", str(root / stage.output))
            _default(section, "seed", recipe.seed)
            _default(section, "data.prompt_template", recipe.prompt_template)
        else:  # a data stage (sample, curate): the recipe's seed and template too
            keys = {f.name for f in dataclasses.fields(stage.config)}
            for key, value in (("seed", recipe.seed), ("prompt_template", recipe.prompt_template)):
                if key in keys:
                    _default(section, key, value)
        for inp in stage.inputs:
            if inp.stage in present and not (inp.unless and _get(section, inp.unless)):
                _default(section, inp.key, str(root / S.get_stage(inp.stage).output / inp.file).rstrip("/"))
        if recipe.budget_episodes is not None:
            _apply_budget(section, stage, recipe.budget_episodes)
        plan.stages[name] = build_config(stage.config, section, prefix=f"{name}.")
    return plan


def _variants_section(section: dict[str, Any], sft: dict[str, Any], plan: Plan, present: list[str]) -> Any:
    """The `sft_variants` section as its config: each variant the `sft` section merged with the
    variant's keys, wired as the sft stage is, in its own directory (align/variants.py)."""
    from align.config import SFTConfig, SFTVariantsConfig
    from align.variants import check_name, merge

    stage, sft_stage = S.get_stage("sft_variants"), S.get_stage("sft")
    out = plan.root / stage.output
    sft.pop("output_dir", None)  # the sft run's directory, not a variant's
    variants = {}
    for name, changes in section.items():
        check_name(name)
        if changes is not None and not isinstance(changes, dict):
            raise ConfigError(f"recipe key 'sft_variants.{name}' must be a section (the keys it changes)")
        merged = merge(sft, changes or {})
        _default(merged, "output_dir", str(out / name))
        _default(merged, "seed", plan.recipe.seed)
        _default(merged, "data.prompt_template", plan.recipe.prompt_template)
        for inp in sft_stage.inputs:
            if inp.stage in present:
                _default(merged, inp.key, str(plan.root / S.get_stage(inp.stage).output / inp.file).rstrip("/"))
        variants[name] = build_config(SFTConfig, merged, prefix=f"sft_variants.{name}.")
    return build_config(SFTVariantsConfig, {"output_dir": str(out), "variants": variants}, prefix="sft_variants.")


def _task_section(section: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    from align.tasks import get_task

    if "name" not in section:
        raise ConfigError("missing required recipe key 'task.name'")
    section.setdefault("seed", recipe.seed)
    try:
        get_task(section["name"])
    except ValueError as e:
        raise ConfigError(f"recipe key 'task.name': {e}") from None
    return section


def _apply_budget(section: dict[str, Any], stage: S.Stage, episodes: int) -> None:
    """Set a stage's budget from `budget_episodes`; a different value in the section is an error."""
    if stage.budget_key is not None:
        key, value = stage.budget_key, episodes
    elif stage.name == "dpo":  # pairs: max_steps x the (typed) global batch
        t = build_config(stage.config, copy.deepcopy(section), prefix="dpo.").train
        key, value = "train.max_steps", max(1, episodes // (t.batch_size * t.grad_accum))
    else:
        return
    given = _get(section, key)
    if given is not None and given != value:
        raise ConfigError(f"recipe key '{stage.name}.{key}' ({given}) contradicts 'budget_episodes' "
                          f"(which sets it to {value}); remove one of them")
    _default(section, key, value)


def _wire_eval(section: dict[str, Any], plan: Plan, present: list[str]) -> None:
    """Eval's defaults: every model the recipe trains (SFT and each method, named `sft+<method>`),
    the SFT model as the reference, the first RL method's reward and prompts."""
    root, recipe = plan.root, plan.recipe
    _default(section, "output_dir", str(root / "eval"))
    _default(section, "seed", recipe.seed)
    _default(section, "prompt_template", recipe.prompt_template)
    sft = "sft" in present
    if not section.get("models"):
        models = [n for n in present if n == "sft" or S.get_stage(n).method]
        paths = [str(root / S.get_stage(n).output) for n in models]
        names = [f"sft+{n}" if n != "sft" and sft else n for n in models]
        if "sft_variants" in plan.stages:  # each variant beside sft (the baseline stays first)
            from align.variants import eval_name

            at = 1 if sft else 0
            variants = plan.stages["sft_variants"].variants
            paths[at:at] = [v.output_dir for v in variants.values()]
            names[at:at] = [eval_name(n) for n in variants]
        section["models"] = paths
        section.setdefault("names", names)
    if sft:
        _default(section, "reference", str(root / "sft"))
        if plan.stages["sft"].data.validation:
            _default(section, "validation", plan.stages["sft"].data.validation)
    rl = next((plan.stages[s.name] for s in S.rl_stages() if s.name in plan.stages), None)
    if rl is not None:
        if rl.reward.model:
            _default(section, "reward_model", rl.reward.model)
        elif rl.reward.function:
            _default(section, "reward_function", rl.reward.function)
        _default(section, "response_length", rl.ppo.response_length)
        if rl.eval.prompts:
            _default(section, "prompts", rl.eval.prompts)
        if rl.eval.gold_reward:
            _default(section, "gold_reward", rl.eval.gold_reward)


# ----------------------------------------------------------------------------------------------
# Running


def run_stage(plan: Plan, name: str) -> None:
    stage, cfg, out = S.get_stage(name), plan.stages[name], plan.output(name)
    try:
        if name == "task":
            stage.run(cfg, out)
        elif name == "init_model":
            if out.exists():
                shutil.rmtree(out)  # a directory without config.json is a build cut short
            stage.run(cfg, out)
        elif not stage.training:
            stage.run(cfg)
        else:
            resume = RunDir(out).has_checkpoints()
            if resume:
                print(f"run: {name}: resuming the interrupted run in {out}", flush=True)
            stage.run(cfg, resume=resume)
    finally:
        release_locks()


def check_recipe(plan: Plan, from_stage: str | None = None) -> list[dict[str, Any]]:
    """Check every stage that would run, as its command's `--dry-run` does; return their plans.
    Nothing is written.

    A stage that reads the output of an earlier stage that has not run yet cannot be checked in
    full (its model or data do not exist yet): it is reported as `inputs produced by <stage>`, and
    what it reads that already exists (data files, line by line; reward function imports) is checked.
    """
    order = list(plan.stages)
    if from_stage is not None and from_stage not in order:
        raise AlignError(f"--from {from_stage}: the recipe's stages are {', '.join(order)}")
    rerun = order[order.index(from_stage):] if from_stage else []
    pending: list[str] = []
    plans = []
    for name in order:
        cfg, out = plan.stages[name], plan.output(name)
        if name not in rerun and plan.is_complete(name):
            plans.append({"stage": name, "status": f"complete, skipped ({out})"})
            continue
        producers = [p for p in pending if _reads(cfg, plan.output(p))]
        pending.append(name)
        try:
            if producers:
                produced = [plan.output(p) for p in producers]
                check = S.get_stage(name).check_inputs
                if check is not None:
                    check(cfg, lambda *paths: all(p is None or not any(_under(p, o) for o in produced) for p in paths))
                plans.append({"stage": name, "status": f"inputs produced by {', '.join(producers)}",
                              "output_dir": str(out)})
            else:
                plans.append(_dry_run(name, cfg, out, rerun=name in rerun))
        except AlignError as e:
            raise AlignError(f"stage {name}: {e}") from None
        finally:
            release_locks()
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
    return any(_under(s, out) for s in _paths(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)))


def _dry_run(name: str, cfg: Any, out: Path, rerun: bool) -> dict[str, Any]:
    """The `--dry-run` plan of one stage whose inputs all exist."""
    stage = S.get_stage(name)
    if name in ("task", "init_model"):
        settings = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
        return {"stage": name, "status": "settings checked; nothing to read", "output_dir": str(out), **settings}
    resume = not rerun and RunDir(out).has_checkpoints()
    if not stage.training:
        plan = stage.run(cfg, dry_run=True)
    else:
        if rerun and out.exists():  # --from deletes this output first: check the run as if it were gone
            cfg = dataclasses.replace(cfg, output_dir=str(out.with_name(f".{out.name}.rerun")))
        plan = stage.run(cfg, resume=resume, dry_run=True)
    return {**plan, "output_dir": str(out) + (" (resumed)" if resume else " (deleted and rerun)" if rerun else "")}


def run_recipe(path: str, overrides: tuple[str, ...] = (), from_stage: str | None = None) -> Plan:
    """Run every stage of the recipe at `path` that is not complete yet; then the report. Every
    stage's inputs are checked first (`check_recipe`), so a bad file of a late stage is reported
    before the early stages spend their compute."""
    plan = load_recipe(path, overrides)
    order = list(plan.stages)
    if from_stage is not None:
        if from_stage not in order:
            raise AlignError(f"--from {from_stage}: the recipe's stages are {', '.join(order)}")
        for name in order[order.index(from_stage):]:
            if plan.output(name).exists():
                shutil.rmtree(plan.output(name))
    check_recipe(plan)
    plan.root.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch or torchrun every process runs the recipe
        atomic_write_text(plan.root / "recipe.yaml", yaml.safe_dump(
            {"recipe": str(path), "overrides": list(overrides), "stages": {
                s: (c if isinstance(c, dict) else dataclasses.asdict(c)) for s, c in plan.stages.items()}},
            sort_keys=False))
    t0 = time.time()
    for k, name in enumerate(order, 1):
        header = f"run: stage {k} of {len(order)}: {name}"
        if plan.is_complete(name):
            print(f"{header}: complete, skipped ({plan.output(name)})", flush=True)
            continue
        print(f"{header} -> {plan.output(name)}", flush=True)
        t_stage = time.time()
        run_stage(plan, name)
        print(f"run: {name} done in {time.time() - t_stage:.1f}s", flush=True)
    if "eval" in plan.stages:
        from align.compare import compare

        report = compare([str(plan.output("eval"))], str(plan.root / "report"))
        print(report["table"]["text"], flush=True)
        print(f"run: report in {plan.root / 'report'} (report.md, report.html)", flush=True)
    print(f"run: all stages complete in {time.time() - t0:.1f}s", flush=True)
    return plan



# ----------------------------------------------------------------------------------------------
# Seeds


def _seed_list(text: str, where: str) -> list[int]:
    from align.stats import parse_seeds

    try:
        return parse_seeds(str(text))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def run_seeds(path: str, overrides: tuple[str, ...], seeds: str | None, jobs: int = 1, check: bool = False,
              from_stage: str | None = None) -> dict[str, Any]:
    """The whole recipe once per seed, under `<root>/seed-N/` (complete stages reused, interrupted
    ones resumed, as a single run), `jobs` seeds at a time as separate local processes (each with
    its share of the cores); then the comparison over seeds (align/multiseed.py) in `<root>/report`,
    and with `check`, the recipe's `expect:` block, PASS/FAIL per line."""
    import os
    import subprocess
    import sys

    from align import multiseed
    from align.provenance import provenance_text

    plan = load_recipe(path, overrides)
    text = seeds if seeds is not None else plan.recipe.seeds
    if text is None:
        raise AlignError("no seeds: pass --seeds (e.g. --seeds 0-4) or set the recipe key 'seeds'")
    seed_list = _seed_list(text, "--seeds")
    if jobs < 1:
        raise AlignError("--jobs must be >= 1")
    root = plan.root

    def args(seed: int) -> tuple[str, ...]:
        return (*overrides, f"seed={seed}", f"output_root={root / f'seed-{seed}'}")

    for seed in seed_list:  # every seed's configs are valid before any compute
        load_recipe(path, args(seed))
    t0 = time.time()
    if jobs == 1:
        for seed in seed_list:
            print(f"run: seed {seed} ({seed_list.index(seed) + 1} of {len(seed_list)})", flush=True)
            run_recipe(path, args(seed), from_stage)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        pending, running = list(seed_list), []
        while pending or running:
            while pending and len(running) < jobs:
                seed = pending.pop(0)
                (root / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
                log = open(root / f"seed-{seed}" / "run.log", "a", encoding="utf-8")
                cmd = [sys.executable, "-m", "align", "run", path, *(x for a in args(seed) for x in ("--set", a))]
                if from_stage:
                    cmd += ["--from", from_stage]
                running.append((seed, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
                print(f"run: seed {seed} started ({threads} thread(s)); log in {root / f'seed-{seed}' / 'run.log'}",
                      flush=True)
            time.sleep(1)
            for item in list(running):
                seed, proc, log = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    if proc.returncode != 0:
                        for _, other, _ in running:
                            other.terminate()
                        raise AlignError(f"seed {seed} failed (exit {proc.returncode}); see "
                                         f"{root / f'seed-{seed}' / 'run.log'}")
                    print(f"run: seed {seed} done", flush=True)
    print(f"run: {len(seed_list)} seeds complete in {time.time() - t0:.1f}s", flush=True)
    out: dict[str, Any] = {"seeds": seed_list}
    if "eval" in plan.stages:
        report = multiseed.write_report(root, root / "report", provenance_text())
        print(report["text"].split("\n## Within")[0], flush=True)
        print(f"run: report over seeds in {report['report']}", flush=True)
        out.update(report)
    if check:
        out["passed"] = check_expectations(plan, out.get("values") or {})
    return out


def check_expectations(plan: Plan, values: dict[int, dict[str, float]]) -> bool:
    """Print each expectation of the recipe with PASS/FAIL and its measured value."""
    from align.expect import all_passed, check, format_outcomes, parse_expectations

    if not plan.recipe.expect:
        raise AlignError("--check: the recipe has no 'expect' block")
    outcomes = check(parse_expectations(plan.recipe.expect, "recipe"), values)
    print(format_outcomes(outcomes), flush=True)
    return all_passed(outcomes)
