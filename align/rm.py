"""`align rm`: a reward model from preference pairs.

The model is `AutoModelForSequenceClassification(num_labels=1)` on the policy's backbone family,
read at the last real token of `prompt + response + EOS` (the position is taken from lengths).
It is trained with the Bradley-Terry loss averaged over the pairs of the global batch:

    L = mean_pairs -log sigmoid(r_chosen - r_rejected - margin)

Metrics: loss, accuracy (r_chosen > r_rejected) and mean margin (r_chosen - r_rejected), on the
training window and the held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from align import data as D
from align.checkpoint import resume_point
from align.config import RMConfig
from align.errors import AlignError
from align.modeling import ScoreModel, context_length, fold_score_offset, last_token_index, load_score_model
from align.reward import NORMALIZATION_FILE
from align.rl import bradley_terry_loss
from align.trainer import Stage, check_schedule, fit, open_stage, supervised_plan


def read_pair_records(cfg: RMConfig) -> tuple[list[D.Record], list[D.Record]]:
    """Read the train (and validation) pairs and check every one; also the `normalize_with` file,
    which is only used after training but must not fail then."""
    d = cfg.data
    records = D.read_records(d.train, d.split, d.max_samples, d.dataset_config, d.columns)
    if D.detect_format(records, d.format) != "preference":
        raise AlignError(f"{records[0].where}: the reward model needs preference pairs {{prompt, chosen, rejected}}")
    D.validate_records(records, "preference")
    if d.validation:
        val_records = D.read_records(d.validation, d.validation_split, None, d.dataset_config, d.columns)
        D.validate_records(val_records, "preference")
    else:
        records, val_records = D.split_validation(records, d.val_fraction, cfg.seed)
    if cfg.normalize_with:
        if not Path(cfg.normalize_with).is_file():
            raise AlignError(f"config key 'normalize_with': file '{cfg.normalize_with}' does not exist")
        norm = D.read_records(cfg.normalize_with)
        fmt = D.detect_format(norm)
        if fmt == "preference":
            raise AlignError(f"{norm[0].where}: config key 'normalize_with' needs prompt/response records, "
                             "not preference pairs")
        D.validate_records(norm, fmt)
    return records, val_records


def load_pairs(cfg: RMConfig, tokenizer: Any, context: int | None = None) -> tuple[list, list, str]:
    d = cfg.data
    records, val_records = read_pair_records(cfg)
    train, report = D.tokenize_pairs(records, d.prompt_template, tokenizer, d.max_length, d.truncation, context)
    val = D.tokenize_pairs(val_records, d.prompt_template, tokenizer, d.max_length, d.truncation,
                           context)[0] if val_records else []
    return train, val, f"train: {report.kept} pairs ({report.dropped} dropped as too long); validation: {len(val)} pairs"


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded ids -> (B,) scores read at each row's last real token."""
    scores = model(input_ids=input_ids, attention_mask=attention_mask)  # (B, T)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def make_terms(margin: float):
    def rm_terms(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Summed Bradley-Terry loss over the batch's pairs, their count, and summed stats."""
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores.chunk(2)
        loss, stats = bradley_terry_loss(chosen, rejected, margin)
        n = torch.tensor(chosen.shape[0], device=scores.device)
        return loss * n, n, {"loss": loss.detach() * n, "accuracy": stats["accuracy"] * n, "margin": stats["margin"] * n}

    return rm_terms


@torch.no_grad()
def normalization_bias(model: ScoreModel, cfg: RMConfig, tokenizer: Any, device: torch.device) -> float:
    """Mean score of the `normalize_with` responses (prompt + response + EOS, as in training)."""
    records = D.read_records(cfg.normalize_with)
    fmt = D.detect_format(records)
    D.validate_records(records, fmt)
    examples, _ = D.tokenize_sft(records, fmt, cfg.data.prompt_template, tokenizer, cfg.data.max_length, "drop")
    model.eval()
    total = 0.0
    for s in range(0, len(examples), cfg.train.batch_size):
        batch = D.pad_examples(examples[s:s + cfg.train.batch_size], tokenizer.pad_token_id)
        total += sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).sum().item()
    return total / len(examples)


def train_rm(cfg: RMConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train and return the summary; with `dry_run`, check every input and return the plan instead."""
    from transformers import AutoModelForSequenceClassification

    # Every input is checked before any weight is loaded: model path, tokenizer, every data line, schedule.
    accelerator, run, model_config, tokenizer = open_stage(cfg, resume, force, dry_run)
    train, val, report = load_pairs(cfg, tokenizer, context_length(model_config))
    n_steps, global_batch = check_schedule(cfg.train, len(train), accelerator.num_processes)
    if dry_run:
        model_config.num_labels = 1
        return supervised_plan("rm", cfg, AutoModelForSequenceClassification, model_config, report, n_steps,
                               global_batch, merged=True)
    ckpt = resume_point(run) if resume else None
    model = load_score_model(cfg.model, cfg.lora, tokenizer, accelerator.device, ckpt)

    def normalization_file(unwrapped: Any) -> dict[str, str]:
        # The mean goes into the head's bias where it has one; `bias` is what is left to subtract from
        # the saved classifier's output, `folded_into_head` what a raw (unnormalised) score adds back.
        # Called before the final weights are gathered, so a folded bias is in what is saved.
        mean = normalization_bias(unwrapped, cfg, tokenizer, accelerator.device) if cfg.normalize_with else 0.0
        folded = fold_score_offset(unwrapped, mean)
        return {NORMALIZATION_FILE: json.dumps({"bias": mean - folded, "folded_into_head": folded,
                                                "normalized_with": cfg.normalize_with})}

    stage = Stage(
        name="rm", terms=make_terms(cfg.margin), merge_lora=True, extra_files=normalization_file,
        collate=lambda pairs: D.pad_pairs(pairs, tokenizer.pad_token_id),
        count=lambda b: torch.tensor(b["input_ids"].shape[0] // 2),
    )
    return fit(stage, t=cfg.train, seed=cfg.seed, run=run, accelerator=accelerator, model=model, tokenizer=tokenizer,
               train_items=train, val_items=val, resume_from=ckpt, report=report, config=cfg)
