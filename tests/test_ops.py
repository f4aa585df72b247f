"""Tests for align.ops: masked reductions, log-probs, and the SFT loss (hand values, naive loops,
padding-side and gradient-accumulation invariance)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align.ops import (
    IGNORE_INDEX,
    entropy_from_logits,
    lengths_to_mask,
    masked_mean,
    masked_nll,
    masked_nll_sum,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
    token_correct,
)

# --------------------------------------------------------------------------------------------
# masks and masked reductions
# --------------------------------------------------------------------------------------------


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([0, 2, 4]), 4)
    expected = torch.tensor(
        [[False, False, False, False], [True, True, False, False], [True, True, True, True]]
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_masked_mean_is_a_token_mean_not_a_mean_of_means():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token mean: (1 + 2 + 3 + 10) / 4 = 4; a mean of per-row means would be (2 + 10) / 2 = 6.
    assert masked_mean(values, mask).item() == pytest.approx(4.0)
    assert masked_sum(values, mask).item() == pytest.approx(16.0)
    assert torch.allclose(masked_mean(values, mask, dim=1), torch.tensor([2.0, 10.0]))
    # a row with an empty mask gives 0, not nan
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert torch.allclose(masked_mean(values, empty, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_var_matches_torch_var_on_selected_values():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = lengths_to_mask(torch.tensor([7, 3, 1, 5]), 7)
    selected = values[mask]
    assert masked_var(values, mask).item() == pytest.approx(selected.var(unbiased=True).item())
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(
        selected.var(unbiased=False).item()
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_whiten_uses_masked_positions_only(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    values = 3.0 + 2.0 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = lengths_to_mask(lengths, T)

    whitened = masked_whiten(values, mask)
    selected = whitened[mask]
    assert selected.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert selected.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(whitened[~mask] == 0)

    # masked-out entries do not influence the statistics
    perturbed = values.clone()
    perturbed[~mask] = 1e3 * torch.randn(int((~mask).sum()), generator=g, dtype=torch.float64)
    assert torch.equal(masked_whiten(perturbed, mask), whitened)

    # shift_mean=False rescales but keeps the mean
    unshifted = masked_whiten(values, mask, shift_mean=False)
    assert unshifted[mask].mean().item() == pytest.approx(values[mask].mean().item())
    assert unshifted[mask].var().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(unshifted[~mask] == 0)


# --------------------------------------------------------------------------------------------
# log-probs and entropy
# --------------------------------------------------------------------------------------------


def test_selective_log_softmax_equals_log_softmax_gather_with_gradients():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    index = torch.randint(0, 11, (3, 5), generator=g)

    out = selective_log_softmax(logits, index)
    (grad_out,) = torch.autograd.grad(out.sum(), logits)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)

    assert out.shape == (3, 5)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(grad_out, grad_expected, atol=1e-6)


def test_selective_log_softmax_upcasts_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g).to(torch.bfloat16)
    index = torch.randint(0, 7, (2, 4), generator=g)
    out = selective_log_softmax(logits, index)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_entropy_from_logits_equals_definition():
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(2, 6, 13, generator=g)
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(entropy_from_logits(logits), expected, atol=1e-5)
    # uniform logits: entropy log V
    uniform = torch.zeros(1, 2, 13)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((1, 2), math.log(13)))


# --------------------------------------------------------------------------------------------
# SFT loss
# --------------------------------------------------------------------------------------------


def _random_sft_batch(seed: int, B: int = 4, T: int = 10, V: int = 7):
    """Random logits and labels with a prompt prefix and right padding set to IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    for i in range(B):
        prompt_len = int(torch.randint(1, 4, (1,), generator=g))
        total_len = int(torch.randint(prompt_len + 1, T + 1, (1,), generator=g))
        labels[i, :prompt_len] = IGNORE_INDEX
        labels[i, total_len:] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_nll_equals_naive_loop(seed):
    logits, labels = _random_sft_batch(seed)
    B, T, _ = logits.shape
    total, count = 0.0, 0
    for i in range(B):
        for t in range(1, T):  # logits at t-1 predict the label at t
            if labels[i, t] == IGNORE_INDEX:
                continue
            logp = torch.log_softmax(logits[i, t - 1], dim=-1)
            total += -logp[labels[i, t]].item()
            count += 1
    s, n = masked_nll_sum(logits, labels)
    assert n.item() == count
    assert s.item() == pytest.approx(total, rel=1e-5)
    assert masked_nll(logits, labels).item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_nll_equals_cross_entropy_ignore_index(seed):
    logits, labels = _random_sft_batch(seed)
    V = logits.shape[-1]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert masked_nll(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_accuracy_and_perplexity_hand_example():
    # vocab of 3; position 0 is a prompt token, position 4 is padding.
    ln2 = math.log(2.0)
    logits = torch.tensor(
        [
            [
                [ln2, 0.0, 0.0],  # predicts label 0: p = 1/2, argmax 0 -> correct
                [ln2, 0.0, 0.0],  # predicts label 1: p = 1/4, argmax 0 -> wrong
                [0.0, 0.0, ln2],  # predicts label 2: p = 1/2, argmax 2 -> correct
                [5.0, 0.0, 0.0],  # predicts padding: ignored
                [0.0, 9.0, 0.0],  # last position predicts nothing
            ]
        ]
    )
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, 2, IGNORE_INDEX]])

    loss = masked_nll(logits, labels)
    expected_loss = (math.log(2) + math.log(4) + math.log(2)) / 3  # = 4/3 ln 2
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert math.exp(loss.item()) == pytest.approx(2 ** (4 / 3), rel=1e-6)  # perplexity

    correct, total = token_correct(logits, labels)
    assert (correct.item(), total.item()) == (2, 3)


def test_masked_nll_unchanged_by_padding_side():
    # A position-independent model (embedding -> linear), so the logits of a real token do not
    # depend on where the padding sits; the loss must then be identical under left/right padding.
    torch.manual_seed(0)
    V, H, PAD = 9, 5, 0
    emb, head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V)
    sequences = [  # (prompt tokens, response tokens)
        ([1, 2, 3], [4, 5]),
        ([6], [7, 8, 3, 2]),
        ([2, 2], [5]),
    ]
    T = max(len(p) + len(r) for p, r in sequences)

    def build(left: bool):
        ids = torch.full((len(sequences), T), PAD)
        labels = torch.full((len(sequences), T), IGNORE_INDEX)
        for i, (prompt, response) in enumerate(sequences):
            seq = prompt + response
            start = T - len(seq) if left else 0
            ids[i, start : start + len(seq)] = torch.tensor(seq)
            labels[i, start + len(prompt) : start + len(seq)] = torch.tensor(response)
        return ids, labels

    losses = []
    for left in (False, True):
        ids, labels = build(left)
        losses.append(masked_nll(head(emb(ids)), labels))
    assert build(False)[0].tolist() != build(True)[0].tolist()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)


def test_masked_nll_gradient_accumulation_equals_whole_batch():
    torch.manual_seed(0)
    B, T, H, V = 6, 8, 4, 5
    features = torch.randn(B, T, H)
    labels = torch.randint(0, V, (B, T))
    # very different numbers of response tokens per row, so a mean of chunk means would differ
    for i, (prompt_len, total_len) in enumerate([(1, 8), (2, 3), (3, 8), (1, 2), (4, 7), (2, 8)]):
        labels[i, :prompt_len] = IGNORE_INDEX
        labels[i, total_len:] = IGNORE_INDEX
    layer = torch.nn.Linear(H, V)

    layer.zero_grad()
    whole = masked_nll(layer(features), labels)
    whole.backward()
    grads_whole = [p.grad.clone() for p in layer.parameters()]

    # accumulation: each chunk's summed NLL divided by the global token count
    layer.zero_grad()
    chunks = [(0, 1), (1, 4), (4, 6)]
    global_count = sum(masked_nll_sum(layer(features[a:b]), labels[a:b])[1] for a, b in chunks)
    accumulated = 0.0
    naive_chunk_means = []
    for a, b in chunks:
        s, n = masked_nll_sum(layer(features[a:b]), labels[a:b])
        (s / global_count).backward()
        accumulated += s.item() / global_count.item()
        naive_chunk_means.append((s / n).item())
    grads_accum = [p.grad.clone() for p in layer.parameters()]

    assert accumulated == pytest.approx(whole.item(), rel=1e-6)
    for gw, ga in zip(grads_whole, grads_accum):
        assert torch.allclose(gw, ga, atol=1e-6)
    # the test has power: averaging per-chunk means is a different (wrong) loss here
    assert sum(naive_chunk_means) / len(chunks) != pytest.approx(whole.item(), rel=1e-3)
