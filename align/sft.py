"""`align sft`: supervised fine-tuning with masked NLL on response tokens.

The loop, top to bottom: load data and model, then for each optimizer step take one global batch,
split it across processes and micro-batches, and divide every micro-batch's summed NLL by the
global batch's response-token count. The gradient is then exactly that of

    L = sum_t mask_t * CE(y_t, p(. | x, y_<t)) / sum_t mask_t

over the whole global batch (a token mean, not a mean of per-sequence means), whatever the
gradient accumulation or number of processes (TRL does the same with `num_items_in_batch`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from align import data as D
from align.config import SFTConfig
from align.modeling import apply_lora, count_parameters, load_pretrained, load_tokenizer, save_model
from align.ops import masked_nll_sum, token_correct
from align.runtime import (Checkpointer, MetricsLogger, Throughput, finish_model, load_trainer_state,
                           make_accelerator, make_optimizer, make_scheduler, peak_memory_mb, prepare_run_dir,
                           progress, rng_state, set_rng_state, set_seed, write_summary)


def load_sft_examples(cfg: SFTConfig, tokenizer: Any) -> tuple[list[D.Example], list[D.Example], str]:
    """Read, validate and tokenize the train (and validation) records. Returns a report line."""
    d = cfg.data
    records = D.read_records(d.train, d.split, d.max_samples)
    fmt = D.detect_format(records, d.format)
    D.validate_records(records, fmt)
    if d.validation:
        val_records = D.read_records(d.validation, d.split)
        D.validate_records(val_records, D.detect_format(val_records, d.format))
    else:
        records, val_records = D.split_validation(records, d.val_fraction, cfg.seed)
    train, train_report = D.tokenize_sft(records, fmt, d.prompt_template, tokenizer, d.max_length, d.truncation)
    val, _ = D.tokenize_sft(val_records, fmt, d.prompt_template, tokenizer, d.max_length, d.truncation) if val_records else ([], None)
    return train, val, f"format {fmt}; train: {train_report}; validation: {len(val)} examples"


def total_steps(cfg: SFTConfig, n_train: int, global_batch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, int(cfg.train.epochs * (n_train // global_batch)))


@torch.no_grad()
def evaluate(model: Any, examples: list[D.Example], pad_id: int, batch_size: int, accelerator: Any,
             max_batches: int | None = None) -> dict[str, float]:
    """Validation loss, token accuracy and perplexity over response tokens, summed across ranks."""
    model.eval()
    mine = D.shard(list(range(len(examples))), accelerator.process_index, accelerator.num_processes) \
        if len(examples) >= accelerator.num_processes else list(range(len(examples)))
    totals = torch.zeros(3, device=accelerator.device)  # nll sum, correct, tokens
    for b, start in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = D.pad_examples([examples[i] for i in mine[start:start + batch_size]], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = masked_nll_sum(logits, batch["labels"])
        correct, _ = token_correct(logits, batch["labels"])
        totals += torch.stack([nll.float(), correct.float(), n.float()])
    totals = accelerator.reduce(totals, "sum")
    model.train()
    loss = (totals[0] / totals[2].clamp(min=1)).item()
    return {"val/loss": loss, "val/token_accuracy": (totals[1] / totals[2].clamp(min=1)).item(),
            "val/perplexity": float(torch.tensor(loss).exp())}


def train_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    t_start = time.time()
    accelerator = make_accelerator(cfg.train.mixed_precision)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, is_main)

    # ---- data and model
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_ex, val_ex, data_report = load_sft_examples(cfg, tokenizer)
    t = cfg.train
    global_batch = t.batch_size * t.grad_accum * world
    n_steps = total_steps(cfg, len(train_ex), global_batch)
    ckpt = run.latest_checkpoint() if resume else None
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=True, device=accelerator.device)
    if cfg.lora.enabled:
        if ckpt is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
        else:
            model = apply_lora(model, cfg.lora)
    elif ckpt is not None:
        model = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=True,
                                device=accelerator.device, path=str(ckpt))
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t, n_steps)
    # The scheduler is stepped by hand once per optimizer step, so accelerate does not wrap it.
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": float("inf"), "evals_without_gain": 0,
             "tokens_seen": 0, "wall_time": 0.0}
    if ckpt is not None:
        saved = load_trainer_state(ckpt)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state.update(saved["state"])

    trainable, total = count_parameters(model)
    if is_main:
        print(f"sft: {data_report}; {n_steps} steps of {global_batch} examples; "
              f"{trainable:,} of {total:,} parameters trained; {world} process(es) on {accelerator.device}")

    logger = MetricsLogger(run, is_main)
    checkpointer = Checkpointer(run, t.keep_checkpoints)
    unwrapped = accelerator.unwrap_model(model)

    def write_checkpoint() -> None:
        if is_main:
            checkpointer.save(state["step"], lambda p: save_model(unwrapped, tokenizer, p), {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "state": state})
        accelerator.wait_for_everyone()

    # Resume: recompute the epoch order and skip the batches already consumed.
    batches = D.global_batches(len(train_ex), global_batch, cfg.seed, start_epoch=state["epoch"])
    for _ in range(state["batch_in_epoch"]):
        next(batches)

    model.train()
    bar = progress(n_steps, state["step"], "sft", is_main)
    window = torch.zeros(3, device=accelerator.device)  # nll sum, correct, tokens since the last log
    speed = Throughput()
    last_val: dict[str, float] = {}
    t_loop = time.time() - state["wall_time"]
    while state["step"] < n_steps:
        epoch, index, indices = next(batches)
        mine = D.shard(indices, rank, world)
        micro = [D.pad_examples([train_ex[i] for i in mine[s:s + t.batch_size]], tokenizer.pad_token_id)
                 for s in range(0, len(mine), t.batch_size)]
        micro = [{k: v.to(accelerator.device) for k, v in mb.items()} for mb in micro]
        # The global response-token count: every piece of the batch is divided by it.
        n_tokens = accelerator.reduce(sum((mb["labels"][:, 1:] != D.IGNORE_INDEX).sum() for mb in micro), "sum")
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                nll, n = masked_nll_sum(logits, mb["labels"])
                # x world: DDP averages gradients over processes, and we want their sum / n_tokens.
                accelerator.backward(nll * world / n_tokens)
            with torch.no_grad():
                correct, _ = token_correct(logits, mb["labels"])
                window += torch.stack([nll.detach().float(), correct.float(), n.float()])
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["epoch"], state["batch_in_epoch"] = (epoch + 1, 0) if index + 1 == len(train_ex) // global_batch else (epoch, index + 1)
        step_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
        state["tokens_seen"] += step_tokens * world
        speed.add(len(mine) * world, step_tokens * world)
        bar.update(1)

        if state["step"] % t.log_every == 0 or state["step"] == n_steps:
            w = accelerator.reduce(window, "sum")
            loss = (w[0] / w[2].clamp(min=1)).item()
            metrics = {"train/loss": loss, "train/token_accuracy": (w[1] / w[2].clamp(min=1)).item(),
                       "train/perplexity": float(torch.tensor(loss).exp()), "train/grad_norm": float(grad_norm),
                       "lr": scheduler.get_last_lr()[0], "epoch": state["step"] * global_batch / len(train_ex),
                       **speed.rates(), "peak_memory_mb": peak_memory_mb()}
            logger.log(state["step"], metrics)
            bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{last_val['val/loss']:.4f}"} if last_val else {}))
            window.zero_()

        stop = False
        if val_ex and (state["step"] % t.eval_every == 0 or state["step"] == n_steps):
            last_val = evaluate(model, val_ex, tokenizer.pad_token_id, t.batch_size, accelerator, t.max_eval_batches)
            logger.log(state["step"], last_val)
            if last_val["val/loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["evals_without_gain"] = last_val["val/loss"], 0
            else:
                state["evals_without_gain"] += 1
                stop = t.early_stopping_patience is not None and state["evals_without_gain"] >= t.early_stopping_patience
                if stop and is_main:
                    print(f"sft: early stop at step {state['step']}: validation loss has not improved for "
                          f"{state['evals_without_gain']} evaluations (best {state['best_val_loss']:.4f})")
        state["wall_time"] = time.time() - t_loop
        if state["step"] % t.save_every == 0 and state["step"] < n_steps and not stop:
            write_checkpoint()
        if stop:
            break
    bar.close()

    # ---- final model, then the summary that marks the run complete
    if is_main:
        finish_model(run, lambda p: save_model(unwrapped, tokenizer, p, merge_lora=cfg.lora.merge))
    accelerator.wait_for_everyone()
    summary = {"stage": "sft", "steps": state["step"], "examples": len(train_ex), "tokens_seen": state["tokens_seen"],
               "wall_time_sec": time.time() - t_start, "train_time_sec": state["wall_time"],
               "peak_memory_mb": peak_memory_mb(), "best_val_loss": state["best_val_loss"], **last_val}
    if is_main:
        write_summary(run, summary)
    logger.close()
    return summary
