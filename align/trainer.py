"""The supervised training loop shared by `align sft` and `align rm`.

Both stages minimise a sum over items (response tokens for SFT, preference pairs for the reward
model) divided by the item count of the whole global batch. The loop, top to bottom:

    for each optimizer step:
        take one global batch (seeded order, recomputable on resume), this process's share of it,
        split into micro-batches;
        count the batch's items across processes; every micro-batch's summed loss is divided by
        that count (x world size, because DDP averages gradients): the gradient is exactly the
        whole batch's, whatever the accumulation or process count (TRL: `num_items_in_batch`);
        clip, step, schedule; log; evaluate; checkpoint; stop early if validation stalls.

A stage supplies `terms(model, batch) -> (loss_sum, item_count, stat_sums)`; each stat is logged
as stat_sum / item_count over the logging window (train/...) and the validation set (val/...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from align import data as D
from align import sharding
from align.config import TrainConfig
from align.errors import AlignError
from align.checkpoint import Checkpointer
from align.modeling import count_parameters, parameter_counts, save_model
from align.rundir import RunDir, finish_model, write_summary
from align.runtime import (MetricsLogger, NonFiniteGuard, StopRequest, Stopped, Throughput, check_scheduler,
                           make_optimizer, make_scheduler, peak_memory_mb, progress)

Terms = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Stage:
    """What a supervised stage plugs into the loop."""

    name: str
    terms: Terms
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    count: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    """Items a batch contributes to the loss (response tokens, pairs), known before any forward."""
    derive: Callable[[dict[str, float], str], dict[str, float]] = lambda m, prefix: m
    """Adds metrics computed from the averaged ones (e.g. perplexity = exp(loss))."""
    tokens: Callable[[dict[str, torch.Tensor]], int] = lambda b: int(b["attention_mask"].sum())
    merge_lora: bool = False
    extra_files: Callable[[Any], dict[str, str]] | None = None
    """Stage-specific files for the final model directory (name -> text), computed from the trained
    model by every process (a sharded model's forward needs them all), written by the main one."""


def open_stage(cfg: Any, resume: bool, force: bool, dry_run: bool) -> tuple[Any, RunDir, Any, Any]:
    """What every supervised stage does first: processes, seed, the checked run directory, the
    model's config (checked, not loaded) and the tokenizer."""
    from align.modeling import inspect_model, load_tokenizer
    from align.rundir import prepare_run_dir
    from align.runtime import make_accelerator, set_seed

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.report_to, cfg.output_dir)
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, accelerator.is_main_process, force, dry_run)
    model_config = inspect_model(cfg.model.path, "model.path", cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               key="model.tokenizer" if cfg.model.tokenizer else "model.path")
    return accelerator, run, model_config, tokenizer


def total_steps(t: TrainConfig, n_train: int, global_batch: int) -> int:
    if t.max_steps is not None:
        return t.max_steps
    return max(1, int(t.epochs * (n_train // global_batch)))


def check_schedule(t: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(optimizer steps, global batch) of a run on `n_train` items; checked before any model loads."""
    global_batch = t.batch_size * t.grad_accum * world
    if n_train < global_batch:
        raise AlignError(f"only {n_train} training examples, fewer than one global batch ({global_batch} = "
                         f"train.batch_size x train.grad_accum x {world} process(es)); lower train.batch_size "
                         "or train.grad_accum")
    n_steps = total_steps(t, n_train, global_batch)
    if t.warmup_for(n_steps) >= n_steps:
        given = f"train.warmup_ratio' ({t.warmup_ratio}: {t.warmup_for(n_steps)} steps)" if t.warmup_ratio is not None \
            else f"train.warmup_steps' ({t.warmup_steps})"
        raise AlignError(f"config key '{given} must be shorter than the run ({n_steps} steps of {global_batch} "
                         "examples)")
    check_scheduler(t, n_steps, "train")
    return n_steps, global_batch


def supervised_plan(name: str, cfg: Any, auto_cls: Any, model_config: Any, report: str, n_steps: int,
                    global_batch: int, merged: bool) -> dict[str, Any]:
    """What an SFT or reward-model run would do (`--dry-run`). Sizes: float32 weights (4 bytes per
    parameter, or per adapter parameter with LoRA) plus AdamW's two moments (8 bytes per trained one)."""
    from align.memplan import dry_run_line

    total, trained = parameter_counts(model_config, auto_cls, cfg.lora, cfg.model.trust_remote_code)
    saved = 4 * (trained if cfg.lora.enabled else total)
    return {"stage": name, "output_dir": cfg.output_dir, "model": cfg.model.path,
            "tokenizer": cfg.model.tokenizer or cfg.model.path, "parameters": total, "trained_parameters": trained,
            "data": report, "steps": n_steps, "global_batch": global_batch, "checkpoint_bytes": saved + 8 * trained,
            "final_model_bytes": 4 * total if merged or not cfg.lora.enabled else saved,
            "memory": dry_run_line(name, cfg)}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _averages(sums: dict[str, torch.Tensor], count: torch.Tensor, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": (v / count.clamp(min=1)).item() for k, v in sums.items()}


@torch.no_grad()
def evaluate(stage: Stage, model: Any, items: list[Any], batch_size: int, accelerator: Any,
             max_batches: int | None = None) -> dict[str, float]:
    """Validation metrics over the whole validation set (each process takes a share, sums are
    reduced), each averaged over items: `val/<stat>`."""
    model.eval()
    # Strided, not D.shard: every example is evaluated once whatever the process count (sums are reduced).
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    n_batches = -(-len(mine) // batch_size)
    if sharding.strategy(accelerator) is not None:
        # A sharded forward is collective: every process runs as many batches as the process with
        # the most, re-running its first batch uncounted where it has none left.
        n_batches = -(-(-(-len(items) // accelerator.num_processes)) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=accelerator.device)
    for start in range(0, n_batches * batch_size, batch_size):
        chunk = mine[start:start + batch_size]
        batch = _to(stage.collate([items[i] for i in chunk or (mine or [0])[:batch_size]]), accelerator.device)
        _, n, stats = stage.terms(model, batch)
        if not chunk:
            continue
        count += n
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.float()
    model.train()
    sums = {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
    return stage.derive(_averages(sums, accelerator.reduce(count, "sum"), "val"), "val")


def fit(stage: Stage, *, t: TrainConfig, seed: int, run: RunDir, accelerator: Any, model: Any, tokenizer: Any,
        train_items: list[Any], val_items: list[Any], resume_from: Path | None, report: str,
        config: Any = None) -> dict[str, Any]:
    """Train `model` (already built, LoRA applied, weights restored when resuming) and write the
    final model and summary into `run`. Returns the summary. `config`: the command's config, sent
    to the trackers as the run's hyper-parameters."""
    t_start = time.time()
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    n_steps, global_batch = check_schedule(t, len(train_items), world)
    batches_per_epoch = len(train_items) // global_batch
    optimizer = make_optimizer(model.parameters(), t.lr, t.weight_decay, t.adam_betas)
    scheduler = make_scheduler(optimizer, t, n_steps)
    sharding.configure_deepspeed(accelerator, t.batch_size, t.max_grad_norm)
    # The scheduler is stepped by hand once per optimizer step, so accelerate does not wrap it.
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    checkpointer = Checkpointer(run, t.keep_checkpoints, accelerator, models={"model": (unwrapped, tokenizer)},
                                stateful={"optimizer": optimizer, "scheduler": scheduler}, prepared={"model": model},
                                optimizers={"optimizer": (model, optimizer)})
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": float("inf"), "evals_without_gain": 0,
             "tokens_seen": 0, "train_time": 0.0}
    if resume_from is not None:
        state.update(checkpointer.restore(resume_from))

    trainable, total = count_parameters(model)
    if is_main:
        print(f"{stage.name}: {report}; {n_steps} steps of {global_batch}; {trainable:,} of {total:,} parameters "
              f"trained; {world} process(es) on {accelerator.device}", flush=True)
        if resume_from is not None:
            print(f"{stage.name}: resumed from {resume_from} at step {state['step']}", flush=True)

    logger = MetricsLogger(run, is_main, state["step"] if resume_from is not None else None, accelerator, config)

    # The epoch order is recomputed from the seed; a resumed run skips what it already consumed.
    batches = D.global_batches(len(train_items), global_batch, seed, start_epoch=state["epoch"])
    for _ in range(state["batch_in_epoch"]):
        next(batches)

    model.train()
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    stop_request = StopRequest().__enter__()
    bar = progress(n_steps, state["step"], stage.name, is_main)
    window_sums: dict[str, torch.Tensor] = {}
    window_count = torch.zeros((), device=accelerator.device)
    speed = Throughput()
    last_val: dict[str, float] = {}
    t_loop = time.time() - state["train_time"]
    while state["step"] < n_steps:
        epoch, index, indices = next(batches)
        mine = D.shard(indices, rank, world)
        micro = [_to(stage.collate([train_items[i] for i in mine[s:s + t.batch_size]]), accelerator.device)
                 for s in range(0, len(mine), t.batch_size)]
        # The global batch's item count: every micro-batch's loss sum is divided by it.
        n_items = accelerator.reduce(sum(stage.count(mb) for mb in micro), "sum")
        step_loss = torch.zeros((), device=accelerator.device)
        step_window: dict[str, torch.Tensor] = {}
        step_count = torch.zeros((), device=accelerator.device)
        for j, mb in enumerate(micro):
            with sharding.accumulating(accelerator, [model], accumulate=j < len(micro) - 1):
                loss_sum, n, stats = stage.terms(model, mb)
                accelerator.backward(loss_sum * world / n_items)
            step_loss += loss_sum.detach()
            step_count += n.detach()
            for k, v in stats.items():
                step_window[k] = step_window.get(k, 0) + v.detach().float()
        # (Under DeepSpeed the engine clipped and stepped inside the last backward: the guard can
        # stop a diverged run but not skip its update; `optimizer.step()` is a no-op there.)
        grad_norm = sharding.clip_grad_norm(accelerator, model, t.max_grad_norm)
        # A non-finite loss or gradient: skip this update (the batch is still consumed).
        if guard.check(accelerator.reduce(step_loss, "sum"), grad_norm):
            optimizer.step()
            window_count += step_count
            for k, v in step_window.items():
                window_sums[k] = window_sums.get(k, 0) + v
        elif is_main:
            bar.write(f"{stage.name}: step {state['step'] + 1}: non-finite loss or gradient, update skipped "
                      f"({guard.in_a_row} in a row)")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["epoch"], state["batch_in_epoch"] = (epoch + 1, 0) if index + 1 == batches_per_epoch else (epoch, index + 1)
        step_tokens = sum(stage.tokens(mb) for mb in micro) * world
        state["tokens_seen"] += step_tokens
        speed.add(len(mine) * world, step_tokens)
        bar.update(1)

        if state["step"] % t.log_every == 0 or state["step"] == n_steps:
            sums = {k: accelerator.reduce(v, "sum") for k, v in window_sums.items()}
            # A window of skipped (non-finite) steps only has no training averages to report.
            metrics = stage.derive(_averages(sums, accelerator.reduce(window_count, "sum"), "train"), "train") \
                if sums else {}
            metrics.update({"train/grad_norm": float(grad_norm), "train/nonfinite_steps": guard.total,
                            "lr": scheduler.get_last_lr()[0],
                            "epoch": state["step"] * global_batch / len(train_items), **speed.rates(),
                            "peak_memory_mb": peak_memory_mb()})
            logger.log(state["step"], metrics)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}",
                            **({"val": f"{last_val['val/loss']:.4f}"} if last_val else {}))
            window_sums, window_count = {}, torch.zeros((), device=accelerator.device)

        stop = False
        if val_items and (state["step"] % t.eval_every == 0 or state["step"] == n_steps):
            last_val = evaluate(stage, model, val_items, t.batch_size, accelerator, t.max_eval_batches)
            logger.log(state["step"], last_val)
            if last_val["val/loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["evals_without_gain"] = last_val["val/loss"], 0
            else:
                state["evals_without_gain"] += 1
                stop = t.early_stopping_patience is not None and state["evals_without_gain"] >= t.early_stopping_patience
                if stop and is_main:
                    print(f"{stage.name}: early stop at step {state['step']}: validation loss has not improved for "
                          f"{state['evals_without_gain']} evaluations (best {state['best_val_loss']:.4f})", flush=True)
        state["train_time"] = time.time() - t_loop
        if stop_request.should_stop(accelerator) and state["step"] < n_steps:
            checkpointer.save(state["step"], state)
            bar.close()
            stop_request.__exit__()
            raise Stopped(f"{stage.name}: stopped at step {state['step']} of {n_steps}; checkpoint saved in "
                          f"{run.checkpoints}, continue with --resume")
        if state["step"] % t.save_every == 0 and state["step"] < n_steps and not stop:
            checkpointer.save(state["step"], state)
        if stop:
            break
    bar.close()
    stop_request.__exit__()

    # The final model, then the summary that marks the run complete. Extra files first: a LoRA
    # merge changes the model in place.
    extras = stage.extra_files(unwrapped) if stage.extra_files is not None else {}
    full = sharding.full_state_dicts(accelerator, {"model": model})["model"]

    def write_final(path: Path) -> None:
        path.mkdir(parents=True)
        for name, text in extras.items():
            (path / name).write_text(text)
        save_model(unwrapped, tokenizer, path, merge_lora=stage.merge_lora, state_dict=full)

    if is_main:
        finish_model(run, write_final)
    accelerator.wait_for_everyone()
    summary = {"stage": stage.name, "steps": state["step"], "examples": len(train_items),
               "tokens_seen": state["tokens_seen"], "wall_time_sec": time.time() - t_start,
               "train_time_sec": state["train_time"], "peak_memory_mb": peak_memory_mb(),
               "best_val_loss": state["best_val_loss"], **last_val}
    if is_main:
        write_summary(run, summary)
    logger.close()
    return summary
