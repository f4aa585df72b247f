"""`align dpo`: Direct Preference Optimization (Rafailov et al. 2023) through TRL's DPOTrainer.

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

summed log-probs over each response's tokens, averaged over the pairs of a batch (TRL's `sigmoid`
loss). The policy starts from the SFT model and the reference is the SFT model, frozen (with LoRA:
the policy with its adapter disabled). The data are the reward model's preference pairs.

What is ours and what is TRL's:
1. ours: read and check the pairs, apply the SFT prompt template to each prompt, drop over-long
   pairs as SFT and RM do; TRL receives plain strings `{prompt, chosen, rejected}`, which it does
   not re-template (only conversational records go through a chat template). It tokenizes prompt
   and prompt+answer with the tokenizer's own special tokens (so the same BOS as ours) and appends EOS;
   conversational answers end with the template's turn end instead, which becomes EOS as in chat SFT
   (`align.modeling.stop_at_turn_end`);
2. ours: load policy and reference (dedicated pad token, dropout off), the LoRA config;
3. TRL: the loss, batching, optimisation, checkpoints (`checkpoints/checkpoint-N`);
4. ours: metrics.jsonl in our names, model/ and summary.json (align/trl_stages.py).
"""

from __future__ import annotations

import time
from typing import Any

from align import data as D
from align.config import DPOStageConfig
from align.errors import AlignError
from align.modeling import inspect_model, load_pretrained, load_tokenizer, peft_lora_config, stop_at_turn_end
from align.checkpoint import load_trainer_state, resume_point
from align.rundir import prepare_run_dir
from align.runtime import MetricsLogger, check_scheduler, make_accelerator, scheduler_kwargs, set_seed
from align.trl_stages import AlignCallback, train_and_finish, training_arguments


def preference_rows(records: list[D.Record], template: str, tokenizer: Any, max_length: int,
                    truncation: str) -> tuple[list[dict[str, Any]], int]:
    """Records -> TRL rows `{prompt, chosen, rejected}` with the template applied to string prompts,
    and the number dropped as longer than `max_length` (prompt + longer answer + EOS, in tokens,
    BOS included). Message-list records are passed on as conversations for TRL's chat template."""
    prefix = D.bos_prefix(tokenizer)
    rows, dropped, problems = [], 0, []
    for rec in records:
        f = rec.fields
        if isinstance(f["chosen"], list):
            prompt = f["prompt"] if isinstance(f["prompt"], list) else [{"role": "user", "content": f["prompt"]}]
            rows.append({"prompt": prompt, "chosen": f["chosen"], "rejected": f["rejected"]})
            continue
        prompt = D.apply_template(template, {"prompt": f["prompt"]}, rec.where)
        longest = max(len(prefix) + len(tokenizer(prompt + f[side], add_special_tokens=False).input_ids) + 1
                      for side in ("chosen", "rejected"))
        if longest > max_length:
            if truncation == "error":
                problems.append(f"{rec.where}: pair is {longest} tokens, longer than data.max_length ({max_length})")
            if truncation != "truncate":
                dropped += 1
                continue
        rows.append({"prompt": prompt, "chosen": f["chosen"], "rejected": f["rejected"]})
    if problems:
        raise D.DataError(problems, D.MAX_REPORTED_PROBLEMS)
    return rows, dropped


def read_pairs(source: str, cfg: DPOStageConfig, split: str) -> list[D.Record]:
    d = cfg.data
    records = D.read_records(source, split, d.max_samples, d.dataset_config, d.columns)
    fmt = D.detect_format(records, cfg.data.format)
    if fmt != "preference":
        raise AlignError(f"{source}: DPO trains on preference pairs {{prompt, chosen, rejected}}, found {fmt} records")
    D.validate_records(records, fmt)
    return records


def train_dpo(cfg: DPOStageConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train and return the summary; with `dry_run`, check the inputs and return the plan."""
    t_start = time.time()
    # Our accelerator holds the trackers (`train.report_to`) our callback logs through; TRL's trainer
    # makes its own on the same process state, with the same mixed precision.
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.report_to, cfg.output_dir)
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, accelerator.is_main_process, force, dry_run)

    # ---- data: pairs with the SFT template applied, over-long ones handled as in SFT and RM
    d, t = cfg.data, cfg.train
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               key="model.tokenizer" if cfg.model.tokenizer else "model.path")
    inspect_model(cfg.model.path, "model.path", cfg.model.trust_remote_code)
    reference_path = cfg.reference or cfg.model.path
    if cfg.reference:
        inspect_model(cfg.reference, "reference", cfg.model.trust_remote_code)
    train_records = read_pairs(d.train, cfg, d.split)
    if d.validation:
        val_records = read_pairs(d.validation, cfg, d.validation_split)
    else:
        train_records, val_records = D.split_validation(train_records, d.val_fraction, cfg.seed)
    # Conversational pairs end each answer with the template's turn end, as chat SFT does: make it EOS.
    chat = any(isinstance(r.fields["chosen"], list) for r in train_records + val_records)
    stop = stop_at_turn_end(tokenizer) if chat else None
    train_rows, dropped = preference_rows(train_records, d.prompt_template, tokenizer, d.max_length, d.truncation)
    val_rows, _ = preference_rows(val_records, d.prompt_template, tokenizer, d.max_length, d.truncation)
    global_batch = t.batch_size * t.grad_accum * accelerator.num_processes
    n_steps = t.max_steps or int(t.epochs * (len(train_rows) // global_batch))
    if n_steps < 1:
        raise AlignError(f"{len(train_rows)} pairs make no batch of {global_batch} (train.batch_size x "
                         f"train.grad_accum x processes); lower train.batch_size")
    check_scheduler(t, n_steps, "train")
    if dry_run:
        from align.memplan import dry_run_line

        return {"stage": "dpo", "output_dir": cfg.output_dir, "policy": cfg.model.path + (" (LoRA)" if cfg.lora.enabled
                                                                                           else ""),
                "reference": "the policy with its adapter disabled" if cfg.lora.enabled and not cfg.reference
                else reference_path,
                "data": f"{len(train_rows)} pairs ({dropped} dropped as longer than {d.max_length} tokens); "
                        f"{len(val_rows)} validation pairs" + (f"; {stop}" if stop else ""), "steps": n_steps,
                "pairs_per_step": global_batch,
                "memory": dry_run_line("dpo", cfg)}

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    # ---- models: the policy (trained), the reference (frozen; none with LoRA: the adapter is disabled)
    policy = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=True)
    reference = None
    if not cfg.lora.enabled or cfg.reference:
        reference = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=False, path=reference_path)

    # ---- TRL does the rest; our callback writes the metrics and marks the checkpoints
    args = DPOConfig(**training_arguments(
        run, seed=cfg.seed, lr=t.lr, batch_size=t.batch_size, grad_accum=t.grad_accum, max_steps=n_steps,
        warmup_steps=t.warmup_for(n_steps), lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs(t), weight_decay=t.weight_decay,
        adam_betas=t.adam_betas, max_grad_norm=t.max_grad_norm, mixed_precision=t.mixed_precision,
        log_every=t.log_every, save_every=t.save_every, keep_checkpoints=t.keep_checkpoints,
        gradient_checkpointing=cfg.model.gradient_checkpointing, disable_dropout=cfg.model.disable_dropout),
        beta=cfg.beta, loss_type=[cfg.loss_type], max_length=d.max_length, per_device_eval_batch_size=t.batch_size,
        eval_strategy="steps" if val_rows else "no", eval_steps=t.eval_every)
    ckpt = resume_point(run) if resume else None
    logger = MetricsLogger(run, accelerator.is_main_process, load_trainer_state(ckpt)["step"] if ckpt else None,
                           accelerator, cfg)
    callback = AlignCallback(run, logger, global_batch, unit="samples", stage="dpo")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tokenizer,
                         peft_config=peft_lora_config(cfg.lora) if cfg.lora.enabled else None, callbacks=[callback])
    if accelerator.is_main_process:
        print(f"dpo: {len(train_rows)} pairs ({dropped} dropped as longer than {d.max_length} tokens), "
              f"{len(val_rows)} validation pairs; {n_steps} steps of {global_batch} pairs; beta {cfg.beta}; "
              f"reference: {'the policy without its adapter' if reference is None else reference_path}"
              + (f"; {stop}" if stop else ""), flush=True)
    return train_and_finish(trainer, run, logger, callback, tokenizer, ckpt, cfg.lora.merge,
                            {"stage": "dpo", "pairs": len(train_rows), "examples": n_steps * global_batch}, t_start)
