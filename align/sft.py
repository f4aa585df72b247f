"""`align sft`: supervised fine-tuning with masked NLL on response tokens.

Input is `prompt + response + EOS`, tokenized once; the loss mask covers the response and EOS.

    L = sum_t mask_t * CE(y_t, p(. | x, y_<t)) / sum_t mask_t

is the mean over every response token of the global batch (a token mean, not a mean of
per-sequence means, so long responses weigh more), identical under gradient accumulation and
across processes (`align/trainer.py` divides each piece by the global token count).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from align import data as D
from align.checkpoint import resume_point
from align.config import SFTConfig
from align.errors import AlignError
from align.modeling import context_length, load_trainable, packs_exactly, stop_at_turn_end
from align.ops import masked_nll_sum, token_correct
from align.trainer import Stage, check_schedule, fit, open_stage, supervised_plan


def read_sft_records(cfg: SFTConfig) -> tuple[list[D.Record], list[D.Record], str]:
    """Read the train (and validation) records and check every one of them: (train, validation, format)."""
    d = cfg.data
    records = D.read_records(d.train, d.split, d.max_samples, d.dataset_config, d.columns)
    fmt = D.detect_format(records, d.format)
    if fmt in ("preference", "prompt"):
        raise AlignError(f"{records[0].where}: SFT needs prompt/response records, not {fmt} records")
    D.validate_records(records, fmt)
    if d.validation:
        val_records = D.read_records(d.validation, d.validation_split, None, d.dataset_config, d.columns)
        D.validate_records(val_records, fmt)  # tokenized like train, so it must have train's format
    else:
        records, val_records = D.split_validation(records, d.val_fraction, cfg.seed)
    return records, val_records, fmt


def load_sft_examples(cfg: SFTConfig, tokenizer: Any, context: int | None = None
                      ) -> tuple[list[D.Example], list[D.Example], str]:
    """Read, validate and tokenize the train (and validation) records, none longer than the
    model's `context`. Returns a report line. Chat records first make the chat template's
    turn-closing token the tokenizer's EOS where it is another token (`stop_at_turn_end`: Gemma's
    `<end_of_turn>`), so the model stops at the token it is trained to end with; the report says so."""
    d = cfg.data
    records, val_records, fmt = read_sft_records(cfg)
    stop = stop_at_turn_end(tokenizer) if fmt == "chat" else None
    train, train_report = D.tokenize_sft(records, fmt, d.prompt_template, tokenizer, d.max_length, d.truncation,
                                         context)
    val, _ = D.tokenize_sft(val_records, fmt, d.prompt_template, tokenizer, d.max_length, d.truncation,
                            context) if val_records else ([], None)
    return train, val, f"format {fmt}; " + (f"{stop}; " if stop else "") + \
        f"train: {train_report}; validation: {len(val)} examples"


def sft_terms(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed NLL over response tokens, their count, and the summed stats to log. A padding-free
    batch (`data.pack_examples`) goes in with its position ids and no attention mask, from which
    transformers builds the per-example causal mask. No KV cache: training never reads one back."""
    if "position_ids" in batch:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits  # (B, T, V)
    nll, n = masked_nll_sum(logits, batch["labels"])
    with torch.no_grad():
        correct, _ = token_correct(logits, batch["labels"])
    return nll, n, {"loss": nll.detach(), "token_accuracy": correct}


def with_perplexity(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {**metrics, f"{prefix}/perplexity": math.exp(min(metrics[f"{prefix}/loss"], 50.0))}


def train_sft(cfg: SFTConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train and return the summary; with `dry_run`, check every input and return the plan instead
    (nothing is loaded but configs and the tokenizer, nothing is written)."""
    from transformers import AutoModelForCausalLM

    # Every input is checked before any weight is loaded: model path, tokenizer, every data line, schedule.
    accelerator, run, model_config, tokenizer = open_stage(cfg, resume, force, dry_run)
    train, val, report = load_sft_examples(cfg, tokenizer, context_length(model_config))
    n_steps, global_batch = check_schedule(cfg.train, len(train), accelerator.num_processes)
    if dry_run:
        return supervised_plan("sft", cfg, AutoModelForCausalLM, model_config, report, n_steps, global_batch,
                               merged=cfg.lora.merge)

    ckpt = resume_point(run) if resume else None
    model = load_trainable(AutoModelForCausalLM, cfg.model, cfg.lora, tokenizer, accelerator.device, ckpt)
    packed = cfg.train.padding_free is not False and packs_exactly(model)
    if cfg.train.padding_free and not packed:
        raise AlignError(f"config key 'train.padding_free': {cfg.model.path} attends across examples packed into one "
                         "row, so packing would change the loss; set it to false (or leave it unset)")
    report += "; batches: " + ("packed (padding-free)" if packed else "padded" + (
        "" if cfg.train.padding_free is False else " (this model attends across packed examples)"))

    stage = Stage(
        name="sft", terms=sft_terms, derive=with_perplexity, merge_lora=cfg.lora.merge,
        collate=lambda exs: (D.pack_examples if packed else D.pad_examples)(exs, tokenizer.pad_token_id),
        count=lambda b: (b["labels"][:, 1:] != D.IGNORE_INDEX).sum(),
        tokens=lambda b: int(b["token_mask" if packed else "attention_mask"].sum()),
    )
    return fit(stage, t=cfg.train, seed=cfg.seed, run=run, accelerator=accelerator, model=model, tokenizer=tokenizer,
               train_items=train, val_items=val, resume_from=ckpt, report=report, config=cfg)
