"""The `align` command line. Each command loads its typed config and calls one stage function.

A user error (`AlignError`) prints one line, `error: ...`, and exits with code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from align.errors import AlignError
from align.stages import training_stages


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an AlignError into one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AlignError as e:
            from align.runtime import Stopped, release_run

            release_run()
            click.echo(str(e) if isinstance(e, Stopped) else f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            from align.rundir import release_locks

            release_locks()
            end_process_group()

    return wrapper


def end_process_group() -> None:
    """Destroy the process group of a distributed run (`accelerate launch`, torchrun) before the
    process exits, as torch.distributed asks. The command does it, not each stage, because a recipe
    chains several stages in one process and they share the group."""
    torch = sys.modules.get("torch")  # only a command that imported torch can have started a group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key (dotted for nested sections), e.g. --set train.lr=1e-4.")
resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run from its latest checkpoint.")
force_option = click.option("--force", is_flag=True, help="With --resume: resume even though the config changed.")
dry_run_option = click.option("--dry-run", is_flag=True,
                              help="Check the config, every data line and the model paths, print the plan; "
                                   "train nothing, write nothing.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align")
def main() -> None:
    """align: SFT, reward modelling and RLHF-PPO as one staged pipeline, compared side by side."""


@main.command("init-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--hidden", default=64, show_default=True, help="Hidden size.")
@click.option("--layers", default=2, show_default=True, help="Transformer layers.")
@click.option("--heads", default=4, show_default=True, help="Attention heads.")
@click.option("--max-position", default=256, show_default=True, help="Longest sequence the model can see.")
@click.option("--vocab-size", default=260, show_default=True,
              help="Tokenizer entries; 260 = the 256 bytes + 4 specials, no merges.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file to learn BPE merges from (only matters when --vocab-size > 260).")
@click.option("--seed", default=0, show_default=True)
@user_errors
def init_model_cmd(out_dir: str, hidden: int, layers: int, heads: int, max_position: int, vocab_size: int,
                   corpus: str | None, seed: int) -> None:
    """Build a tiny Llama-style model and byte-level tokenizer and save both to OUT_DIR."""
    from align.modeling import check_tiny_sizes, init_tiny_model

    check_tiny_sizes(hidden=hidden, layers=layers, heads=heads, max_position=max_position, vocab_size=vocab_size)
    if Path(out_dir).exists():
        raise AlignError(f"output directory '{out_dir}' already exists")
    try:
        lines = Path(corpus).read_text(encoding="utf-8").splitlines() if corpus else None
    except UnicodeDecodeError:
        raise AlignError(f"--corpus '{corpus}': not UTF-8 text") from None
    path = init_tiny_model(out_dir, hidden=hidden, layers=layers, heads=heads, max_position=max_position,
                           vocab_size=vocab_size, corpus=lines, seed=seed)
    click.echo(f"saved a {layers}-layer, {hidden}-wide Llama-style model and its tokenizer to {path}")


def _add_train_command(stage: Any) -> None:
    """`align <stage> CONFIG` with --set / --resume / --force / --dry-run, for a registered stage."""

    @main.command(stage.name, help=stage.help + " The file may use TRL's or LLaMA-Factory's flat key names "
                  "(docs/coming-from.md).")
    @click.argument("config", type=click.Path(dir_okay=False), required=False)
    @set_option
    @resume_option
    @force_option
    @dry_run_option
    @click.option("--print-config", is_flag=True,
                  help="Print how the file's keys map onto align's config, and the resolved config; run nothing.")
    @user_errors
    def command(config: str | None, overrides: tuple[str, ...], resume: bool, force: bool, dry_run: bool,
                print_config: bool) -> None:
        import yaml

        from align.config import build_config, config_dict, to_dict

        data, used = config_dict(stage.config, config, overrides, stage=stage.name)
        cfg = build_config(stage.config, data)
        if print_config:
            for key, meaning in used:
                click.echo(f"# {key} -> {meaning}")
            click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
            return
        summary = stage.run(cfg, resume=resume, force=force, dry_run=dry_run)
        click.echo(plan_text(summary) if dry_run else _summary_line(stage.name, cfg.output_dir, summary))


for _stage in training_stages():
    _add_train_command(_stage)


@main.command("plan")
@click.argument("stage")
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--device", default=None, metavar="cuda|cpu", help="The device to plan for [default: this machine's].")
@click.option("--precision", default=None, metavar="fp32|bf16|fp16",
              help="Compute precision [default: the config's mixed_precision, `auto` resolved for --device].")
@click.option("--processes", default=None, metavar="N",
              help="Processes, one device each, each with its own micro-batch [default: the accelerate launch's, "
                   "else 1].")
@click.option("--strategy", default=None, metavar="none|ddp|fsdp|zero2|zero3",
              help="How the processes hold the trained models: ddp (each a full copy), fsdp (FSDP2, full shard), "
                   "zero2 / zero3 (DeepSpeed); frozen models stay whole on every process [default: the accelerate "
                   "launch's, else ddp with --processes > 1, else none].")
@user_errors
def plan_cmd(stage: str, config: str | None, overrides: tuple[str, ...], device: str | None, precision: str | None,
             processes: str | None, strategy: str | None) -> None:
    """Estimate the peak memory per device of a training STAGE (sft, rm, ppo, dpo, grpo, ...) with its
    CONFIG: weights, gradients, AdamW moments, activations (with or without gradient checkpointing),
    logits, the rollout's KV cache and each PPO model per memory mode. Reads only the models'
    config.json; no data, no weights. Sequences are taken at their longest (`data.max_length`, RL:
    the longest prompt + `ppo.response_length`). Per device and process: under FSDP2 and ZeRO-3 a
    trained model's weights, gradients and AdamW states are split over the processes (ZeRO-2:
    gradients and AdamW states), plus the parameters gathered while a pass runs. Method and
    measured accuracy, one process and sharded: docs/performance.md ("Memory plan")."""
    import os

    from align.config import build_config, config_dict
    from align.memplan import DEVICES, PRECISIONS, STRATEGIES, launch_strategy, model_facts, plan_lines, stage_plan
    from align.stages import BY_NAME

    planned = [s.name for s in training_stages()]
    if stage not in planned:
        raise AlignError(f"no memory plan for stage '{stage}'; the training stages are {', '.join(planned)}")
    if processes is None:
        processes = os.environ.get("WORLD_SIZE", "1")  # set in every process of a launch
    try:
        n = int(processes)
    except ValueError:
        raise AlignError(f"--processes must be an integer (got {processes!r})") from None
    if n < 1:
        raise AlignError(f"--processes must be >= 1 (got {n})")
    if strategy is None:
        strategy = launch_strategy()
    elif strategy not in STRATEGIES:
        raise AlignError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
    if strategy == "none" and n > 1:
        raise AlignError(f"--strategy none is one process (got --processes {n}); use ddp, fsdp, zero2 or zero3")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise AlignError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if precision is not None and precision not in PRECISIONS:
        raise AlignError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    registered = BY_NAME[stage]
    data, _ = config_dict(registered.config, config, overrides, stage=stage)
    cfg = build_config(registered.config, data)
    plan = stage_plan(stage, cfg, model_facts(stage, cfg), device=device, precision=precision, processes=n,
                      strategy=strategy)
    click.echo("\n".join(plan_lines(plan)))


@main.command("eval")
@click.argument("models", nargs=-1)
@click.option("-c", "--config", "config", type=click.Path(dir_okay=False), default=None,
              help="An eval YAML config (see docs/configuration.md); MODELS, if given, replace its `models`.")
@set_option
@user_errors
def eval_cmd(models: tuple[str, ...], config: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate checkpoints or run directories on the same held-out prompts.

    Unset keys are taken from the first PPO run among MODELS (its eval prompts, reward, gold reward,
    reference and prompt template), so `align eval runs/sft runs/ppo --set output_dir=runs/eval` works.
    """
    from align.config import EvalConfig, build_config, parse_override, read_yaml, set_dotted
    from align.evaluate import evaluate_models, infer_eval_defaults

    data = read_yaml(config) if config else {}
    if models:
        data["models"] = list(models)
    for item in overrides:
        set_dotted(data, *parse_override(item))
    data = {**infer_eval_defaults(data.get("models") or []), **data}
    cfg = build_config(EvalConfig, data)
    results = evaluate_models(cfg)
    click.echo(f"eval: wrote {Path(cfg.output_dir) / 'results.json'} ({len(results['models'])} models, "
               f"{results['n_prompts']} prompts)")


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Delete this stage's output and every later stage's, and rerun them.")
@click.option("--seeds", default=None, metavar="SEEDS",
              help="Run the whole recipe once per seed (e.g. 0-4 or 0,2,5) under <root>/seed-N/, then compare "
                   "over seeds; default with --check: the recipe's `seeds`.")
@click.option("--jobs", default=1, show_default=True, type=int, help="Seeds run at once, as local processes.")
@click.option("--check", is_flag=True,
              help="Check the recipe's `expect:` block on the results (over its seeds); exit 1 if one fails.")
@dry_run_option
@user_errors
def run_cmd(recipe: str, overrides: tuple[str, ...], from_stage: str | None, seeds: str | None, jobs: int,
            check: bool, dry_run: bool) -> None:
    """Run every stage of a RECIPE in order: complete stages are skipped, interrupted ones resumed."""
    from align.pipeline import check_recipe, load_recipe, run_recipe, run_seeds

    if dry_run:
        plans = check_recipe(load_recipe(recipe, overrides), from_stage)
        click.echo("\n".join(plan_text(p) for p in plans))
        return
    if seeds is None and not check:
        run_recipe(recipe, overrides, from_stage)
        return
    result = run_seeds(recipe, overrides, seeds, jobs, check, from_stage)
    if check and not result["passed"]:
        sys.exit(1)


def plan_text(plan: dict[str, Any]) -> str:
    """A `--dry-run` plan as lines: `<stage>: dry run ...` then `  key: value`."""
    plan = dict(plan)
    lines = [f"{plan.pop('stage')}: {plan.pop('status', 'dry run: inputs checked; nothing trained, nothing written')}"]
    for key, value in plan.items():
        if key.endswith("_bytes"):  # an expected size
            key, value = key[:-len("_bytes")] + "_size", f"~{value / 2**20:,.1f} MiB" if value >= 2**20 else \
                f"~{value / 2**10:,.1f} KiB"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"  {key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


@main.command("compare")
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Report directory [default: report/ beside the first PATH's eval directory].")
@click.option("--samples", default=8, show_default=True, type=click.IntRange(min=0),
              help="Prompts shown with every model's response.")
@user_errors
def compare_cmd(paths: tuple[str, ...], out: str | None, samples: int) -> None:
    """Put evaluated models side by side: table, win-rates, plots, samples (report.md, report.html).

    Each PATH is an `align eval` output directory (holding results.json) or a pipeline root (holding
    eval/results.json). Win-rates are against the first PATH's baseline model.
    """
    from align.compare import compare

    report = compare(paths, out, samples=samples)
    click.echo(report["table"]["text"])
    for name, reason in report["skipped"].items():
        click.echo(f"compare: skipped plot {name}: {reason}")
    click.echo(f"compare: wrote {report['report_md']} and {report['report_html']}")


@main.command("task")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--size", "sizes", multiple=True, metavar="KEY=N",
              help="Override a size or parameter of the task, e.g. --size n_sft=8000.")
@user_errors
def task_cmd(name: str, out_dir: str, seed: int, sizes: tuple[str, ...]) -> None:
    """Generate a task's data (SFT demos, preference pairs, prompts, eval set) into OUT_DIR.

    An existing OUT_DIR that is not empty is refused, unless it already holds this very task (same
    name, seed and parameters in its task.json): then it is reused as it is."""
    from align.config import parse_override
    from align.tasks import existing_task, get_task, task_params

    try:
        build = get_task(name)
    except ValueError as e:
        raise AlignError(f"task {name}: {e}") from None
    given = dict(parse_override(s) for s in sizes)
    params = task_params(build, given, lambda key: f"--size {key}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        differs = existing_task(out, name, seed, params)
        if differs is None:
            click.echo(f"task: {out_dir} already holds task {name} with seed {seed} and these parameters; reused")
            return
        raise AlignError(f"OUT_DIR '{out_dir}' is not empty ({differs}); give a new directory or delete this one "
                         "(an existing directory is reused only when it holds the identical task)")
    try:
        paths = build(out, seed=seed, **given)
    except (ValueError, TypeError) as e:
        raise AlignError(f"task {name}: {e}") from None
    click.echo(f"wrote {', '.join(sorted(paths))} to {out_dir}")


def _summary_line(stage: str, output_dir: str, summary: dict[str, Any]) -> str:
    shown = {k: v for k, v in summary.items() if k.startswith(("val/", "eval/")) or k in ("steps", "wall_time_sec")}
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    return f"{stage}: done, model in {Path(output_dir) / 'model'} ({', '.join(parts)})"


@main.command("generate")
@click.argument("model_path")
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeat for a batch).")
@click.option("--template", default=None,
              help="Prompt template; defaults to the one in MODEL_PATH's run config, else '{prompt}'.")
@click.option("--chat", is_flag=True,
              help="Send each prompt as one user message through the tokenizer's chat template instead.")
@click.option("--max-new-tokens", default=None, type=int,
              help="Most tokens to sample [default: 64, fewer when the model's context leaves less room].")
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--seed", default=0, show_default=True)
@user_errors
def generate_cmd(model_path: str, prompts: tuple[str, ...], template: str | None, chat: bool,
                 max_new_tokens: int | None,
                 temperature: float, seed: int) -> None:
    """Sample responses from any checkpoint, with the prompt template used in training, or with
    --chat the tokenizer's chat template (what a chat-format SFT run trains on).

    Sampling follows these options alone: nothing from the checkpoint's generation_config.json
    (penalties, top-k/top-p...) applies, so greedy output is the model's argmax."""
    import torch
    from transformers import AutoModelForCausalLM

    from align.config import ModelConfig
    from align.data import apply_template, bos_prefix, render_chat
    from align.generation import decode_responses, sample
    from align.modeling import context_length, inspect_model, load_pretrained, load_tokenizer
    from align.runinfo import run_prompt_template as recorded_template

    if max_new_tokens is not None and max_new_tokens < 1:
        raise AlignError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise AlignError("--temperature must be >= 0")
    if chat and template is not None:
        raise AlignError("--chat and --template exclude each other: --chat applies the tokenizer's chat template")
    # Checked before any weight loads: the path, its config and weight files, then every prompt.
    context = context_length(inspect_model(model_path, "MODEL_PATH", place="MODEL_PATH"))
    tokenizer = load_tokenizer(model_path, padding_side="left")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise AlignError(f"--chat: the tokenizer of '{model_path}' has no chat template")
        # The rendered template carries any BOS itself, as in chat-format training (no prefix).
        texts = [render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True, where="--chat")
                 for p in prompts]
        prefix: list[int] = []
    else:
        template = template or recorded_template(model_path) or "{prompt}"
        texts = [apply_template(template, {"prompt": p}, "--prompt" if len(prompts) == 1 else f"--prompt #{i}")
                 for i, p in enumerate(prompts, 1)]
        prefix = bos_prefix(tokenizer)
    ids = []
    for i, text in enumerate(texts, 1):
        where = "--prompt" if len(prompts) == 1 else f"--prompt #{i}"
        text_ids = tokenizer(text, add_special_tokens=False).input_ids
        if not text_ids:
            raise AlignError(f"{where}: the prompt is empty after templating (no tokens); give a non-empty --prompt")
        n = len(prefix) + len(text_ids)
        if context is not None and n >= context:
            raise AlignError(f"{where}: the prompt is {n} tokens, as long as or longer than the model's context "
                             f"({context} positions), leaving no room for a response; shorten it")
        if context is not None and max_new_tokens is not None and n + max_new_tokens > context:
            raise AlignError(f"{where}: the prompt is {n} tokens; with --max-new-tokens {max_new_tokens} it runs past "
                             f"the model's context ({context} positions); shorten it or lower --max-new-tokens to "
                             f"{context - n} or less")
        ids.append(prefix + text_ids)
    if max_new_tokens is None:  # the default: 64, or what the longest prompt leaves of the context
        max_new_tokens = min(64, context - max(map(len, ids))) if context is not None else 64
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=model_path), tokenizer, trainable=False)
    torch.manual_seed(seed)
    rollout = sample(model, tokenizer, ids, max_new_tokens, temperature=temperature or 1.0, greedy=temperature == 0)
    for p, r in zip(prompts, decode_responses(tokenizer, rollout)):
        click.echo(f"{p}{r}" if len(prompts) == 1 else f"--- {p}\n{r}")


@main.command("export")
@click.argument("run_path", metavar="RUN")
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--merge/--adapter-only", default=True, show_default=True,
              help="A LoRA run: merge the adapter into its base model, or write the adapter alone.")
@click.option("--base-model", default=None, metavar="REPO_ID",
              help="With --adapter-only: the hub id of the adapter's base model, when it was trained on a local one.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO_ID",
              help="Then upload OUT to this hub model repo (created if missing; needs `hf auth login`).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--force", is_flag=True, help="Replace OUT when it exists and is not empty.")
@user_errors
def export_cmd(run_path: str, out_dir: str, merge: bool, base_model: str | None, repo_id: str | None, private: bool,
               force: bool) -> None:
    """Write RUN's final model to OUT as a portable model: from_pretrained(OUT) loads it anywhere, with
    its tokenizer, generation config and model card (and a reward model's align_reward.json)."""
    from align.export import check_repo_id, export_model, push_to_hub

    if private and repo_id is None:
        raise AlignError("--private applies to --push-to-hub")
    if repo_id is not None:
        check_repo_id(repo_id)  # before any work
    out = export_model(run_path, out_dir, merge=merge, base_model=base_model, force=force)
    click.echo(f"export: wrote {out}")
    if repo_id is not None:
        click.echo(f"export: pushed to {push_to_hub(out, repo_id, private)}")


@main.command("sample")
@click.argument("model_path")
@click.option("--prompts", required=True, help="Prompt file (any prompt format).")
@click.option("--best-of", "best_of", default=4, show_default=True, help="K: responses sampled per prompt.")
@click.option("--out", required=True, help="JSONL file to write {prompt, response, score} lines to.")
@click.option("--reward-model", default=None, help="Reward model (an `align rm` run) that chooses.")
@click.option("--reward-function", default=None, help="Or a `module:function` reward.")
@click.option("--template", default=None,
              help="Prompt template; defaults to the one in MODEL_PATH's run config, else '{prompt}'.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Prompts per generate call.")
@click.option("--max-samples", default=None, type=int, help="Use only the first N prompts.")
@click.option("--seed", default=42, show_default=True)
@set_option
@user_errors
def sample_cmd(model_path: str, prompts: str, best_of: int, out: str, reward_model: str | None,
               reward_function: str | None, template: str | None, max_new_tokens: int, temperature: float,
               batch_size: int, max_samples: int | None, seed: int, overrides: tuple[str, ...]) -> None:
    """Best-of-K rejection sampling: K responses per prompt, the reward's favourite kept, written as
    {prompt, response, score} JSONL (SFT data). Keys: see SampleConfig in docs/configuration.md
    (`--set engine=vllm` samples through vLLM)."""
    from align.best_of_n import run_sample
    from align.config import SampleConfig, build_config, parse_override, set_dotted
    from align.runinfo import run_prompt_template

    data = {"model": model_path, "prompts": prompts, "best_of": best_of, "out": out, "reward_model": reward_model,
            "reward_function": reward_function, "prompt_template": template or run_prompt_template(model_path),
            "response_length": max_new_tokens, "temperature": temperature, "batch_size": batch_size,
            "max_samples": max_samples, "seed": seed}
    for item in overrides:
        set_dotted(data, *parse_override(item))
    cfg = build_config(SampleConfig, data)
    s = run_sample(cfg)
    click.echo(f"sample: wrote {s['prompts']} best-of-{s['best_of']} responses to {out} (mean score "
               f"{s['mean_best_score']:.4g} kept vs {s['mean_sample_score']:.4g} per sample; "
               f"{s['tokens_generated']:,} tokens generated in {s['wall_time_sec']:.1f}s)")


@main.command("curate")
@click.argument("data")
@click.option("--out", required=True, help="JSONL file to write the kept records to (must not exist).")
@click.option("--report", default=None, help="Report file (JSON) [default: <out>.report.json].")
@click.option("--score-field", default=None, help="Score each record by this numeric field (e.g. score).")
@click.option("--reward-model", default=None, help="Or score each record with this reward model (an `align rm` run).")
@click.option("--min-score", default=None, type=float, help="Drop records scoring below this.")
@click.option("--no-dedup", is_flag=True, help="Keep exact duplicates (after normalising case and whitespace).")
@click.option("--max-per-prompt", default=None, type=int, help="Keep at most K responses per prompt.")
@click.option("--target", default=None, type=int,
              help="Keep exactly N records, covering as many prompts as possible (fewer left: an error).")
@click.option("--template", default=None,
              help="With --reward-model: its prompt template [default: the one in its run config].")
@set_option
@user_errors
def curate_cmd(data: str, out: str, report: str | None, score_field: str | None, reward_model: str | None,
               min_score: float | None, no_dedup: bool, max_per_prompt: int | None, target: int | None,
               template: str | None, overrides: tuple[str, ...]) -> None:
    """Filter SFT DATA: a score threshold, deduplication, at most K responses per prompt, then down
    to a target size; write the kept records as JSONL and a report of what was dropped and why.
    Steps and sources: align/curate.py. Keys: see CurateConfig in docs/configuration.md."""
    from align.config import CurateConfig, build_config, parse_override, set_dotted
    from align.curate import REASONS, curate

    values = {"data": data, "out": out, "report": report, "score_field": score_field, "reward_model": reward_model,
              "min_score": min_score, "dedup": not no_dedup, "max_per_prompt": max_per_prompt, "target": target,
              "prompt_template": template}
    for item in overrides:
        set_dotted(values, *parse_override(item))
    r = curate(build_config(CurateConfig, values))
    why = ", ".join(f"{r[f'dropped/{k}']} {k.replace('_', ' ')}" for k in REASONS if r[f"dropped/{k}"])
    click.echo(f"curate: kept {r['kept']} of {r['input']} records ({r['prompts_kept']} of {r['prompts_in']} prompts) "
               f"in {out}; dropped {why or 'none'}")


if __name__ == "__main__":
    main()
