"""Pure tensor functions shared by every stage: masked reductions, log-probs, the SFT loss.

Everything here takes tensors and returns tensors; nothing knows about configs, models or
processes, so each function is tested against hand-computed values and naive loops
(`tests/test_ops.py`). Masks are float or bool tensors of the same shape as the values, 1 where
a token counts. They are built from lengths (`lengths_to_mask`), never from token equality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on the first `lengths[i]` positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set (over `dim`, or over everything). Masked-out entries are
    replaced by 0 rather than multiplied by it, so an inf or NaN there cannot leak in."""
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is set: a token mean, not a mean of
    per-sequence means. Over `dim` when given (rows with an empty mask give 0)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked positions (Bessel-corrected by default)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `values` to unit variance (and zero mean when `shift_mean`) using statistics of the
    masked positions only; masked-out positions come back as 0 so they cannot leak into a loss."""
    mask = mask.to(values.dtype)
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


SELECTIVE_LOG_SOFTMAX_VECTORISED_MAX = 2**22
"""Up to this many logits (16 MB in float32) `selective_log_softmax` works on the whole tensor at
once; above it, row by row. Measured in docs/performance.md: the same speed at 32k-150k vocabularies,
where the row loop keeps peak memory at one row's slice."""


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the (B, T, V) log-prob tensor.

    logits: (B, T, V), index: (B, T) -> (B, T). log p(i) = logit_i - logsumexp(logits); computing
    it row by row keeps peak memory at one (T, V) slice instead of a second (B, T, V) copy
    (the same trick as TRL's `selective_log_softmax`). Float32 logits only; lower precisions are
    upcast per row because logsumexp in bf16 loses the small differences PPO ratios depend on.
    """
    if logits.numel() <= SELECTIVE_LOG_SOFTMAX_VECTORISED_MAX:
        # Small tensors: one vectorised pass. The row loop's per-row dispatch cost dominates here
        # (~20x slower at B=8, T=16, V=260); its memory saving only matters for large (T, V) slices.
        logits = logits.float()
        return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()  # (T, V)
        out[i] = row.gather(-1, index[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) entropy of the softmax distribution at each position."""
    pd = torch.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - (pd * logits.float()).sum(-1)


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1: (B, T, V), (B, T) -> (B, T-1, V), (B, T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled tokens, and how many tokens were labelled.

    logits: (B, T, V), labels: (B, T) with IGNORE_INDEX on prompt and padding. Returns the sum (not
    the mean) so a caller splitting a batch for gradient accumulation or across processes can divide
    every piece by the same global token count: the gradient is then identical to the whole
    batch's (see `sft.py`).
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    loss_mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
        shift_labels.reshape(-1).clamp(min=0),
        reduction="none",
    ).view_as(shift_labels)
    return masked_sum(nll, loss_mask), loss_mask.sum()


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SFT loss: L = sum_t mask_t * CE(y_t, p(.|y_<t)) / sum_t mask_t, the mean over every response
    token of the batch (a token mean, not a mean of per-sequence means)."""
    total, count = masked_nll_sum(logits, labels)
    return total / count.clamp(min=1)


def token_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct argmax predictions, labelled tokens) over the response tokens, as two scalars.
    Token accuracy = correct / labelled; kept as counts so batches and processes add up exactly."""
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    loss_mask = shift_labels != IGNORE_INDEX
    correct = (shift_logits.argmax(-1) == shift_labels) & loss_mask
    return correct.sum(), loss_mask.sum()
