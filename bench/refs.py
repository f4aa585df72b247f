"""The straightforward implementations the optimised ones replaced, for `bench/micro.py`'s
before/after timings (the guards in tests/test_perf_guards.py check they agree)."""

from __future__ import annotations

import torch

from align.ops import IGNORE_INDEX


def pad_examples_reference(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """The old collation: one tensor per example written into preallocated rows."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), ids[i, :n], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def selective_log_softmax_rowloop(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The old selective_log_softmax: row by row at every size."""
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        out[i] = row.gather(-1, index[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out
