"""Batched sampling shared by `align generate`, PPO rollouts, evaluation and best-of-n.

Prompts are left-padded so every row's next token sits in the same column, and the KV cache
(transformers' `generate`) makes each new token cost one position, not the whole sequence.

Sampling follows align's settings alone. A checkpoint's `generation_config.json` (a repetition
penalty, top-k/top-p, no-repeat n-grams, a minimum length, banned or forced tokens...) is its
author's chat-time preference; applied here it would make greedy `align generate` output depend on
that file, and make PPO sample from a different distribution than the one it scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from align.rl import truncate_after_eos


@dataclass
class Rollout:
    """Prompts and sampled responses, both as padded id tensors with lengths.

    prompt_ids:      (B, P) left-padded
    prompt_mask:     (B, P) 1 on real prompt tokens
    response_ids:    (B, R) right-padded after the first EOS (EOS included in the response)
    response_mask:   (B, R) 1 on response tokens up to and including EOS
    has_eos:         (B,)   False where the response ran out of room before EOS
    sampler_logprobs: (B, R) the sampled tokens' log-probs as the rollout engine computed them
                     (align/rollout.py), 0 on padding; None when the engine gives none (`hf`)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` (a minibatch), keeping the padded widths."""
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.has_eos[index],
                       None if self.sampler_logprobs is None else self.sampler_logprobs[index])

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different prompt and response widths as one: prompts re-padded on the left,
    responses on the right, masks with them (dynamic sampling joins several generate calls)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    R = max(r.response_ids.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([extra, x] if left else [x, extra], dim=1)

    sampler = None
    if all(r.sampler_logprobs is not None for r in parts):
        sampler = torch.cat([pad(r.sampler_logprobs, R, 0, False) for r in parts])
    return Rollout(torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in parts]),
                   torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
                   torch.cat([pad(r.response_ids, R, pad_id, False) for r in parts]),
                   torch.cat([pad(r.response_mask, R, 0, False) for r in parts]),
                   torch.cat([r.has_eos for r in parts]), sampler)


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: (B, P) ids and (B, P) attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, device=device)
            mask[i, width - len(s):] = 1
    return ids, mask


def sampling_config(tokenizer: Any, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                    top_k: int = 0, top_p: float = 1.0) -> GenerationConfig:
    """The complete `GenerationConfig` of one `sample` call, built from align's settings only.

    Every field a logits processor reads is either set here or left unset on purpose (no penalties,
    no banned, suppressed or forced tokens, no minimum length). top_k is set even when it is 0 (off):
    left unset, `generate` would fill in its global default of 50.
    """
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": 0, "num_beams": 1, "num_return_sequences": 1,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "use_cache": True,
        "do_sample": not greedy}
    if not greedy:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    return GenerationConfig(**settings)


@contextmanager
def without_model_generation_defaults(model: Any) -> Iterator[None]:
    """Blank the model's own generation config for the duration of a `generate` call.

    Passing `generation_config=` is not enough: transformers 5 (`_prepare_generation_config` in
    generation/utils.py) fills every field the passed config leaves None from
    `model.generation_config`, which holds the checkpoint's `generation_config.json`. Fields like
    `bad_words_ids` or `suppress_tokens` cannot be set to "none" explicitly, so the model's defaults
    are swapped for an empty `GenerationConfig()` and restored afterwards. A peft model generates
    through its base model's config, so that is the one swapped.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, top_k: int = 0, top_p: float = 1.0, synced: bool = False) -> Rollout:
    """Sample one response per prompt. Pure temperature sampling by default (top_k 0, top_p 1),
    because PPO scores the responses under the same temperature-scaled distribution and any other
    filter would make the sampler differ from the policy being optimised. Nothing from the model's
    `generation_config.json` applies (see `without_model_generation_defaults`). `synced`: every
    process keeps decoding until all have finished (a sharded model's forward is collective:
    align/sharding.py)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    config = sampling_config(tokenizer, max_new_tokens, temperature, greedy, top_k, top_p)
    was_training = model.training
    model.eval()
    with without_model_generation_defaults(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                             synced_gpus=synced)
    if was_training:
        model.train()
    responses = out[:, prompt_ids.shape[1]:]
    if responses.shape[1] == 0:  # generate may stop at once; keep one column so shapes stay valid
        responses = torch.full((len(prompts), 1), tokenizer.eos_token_id, device=device)
    responses, lengths, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    response_mask = (torch.arange(responses.shape[1], device=device)[None, :] < lengths[:, None]).long()
    return Rollout(prompt_ids, prompt_mask, responses, response_mask, has_eos)


def decode_responses(tokenizer: Any, rollout: Rollout) -> list[str]:
    """Response texts without EOS and padding (cut by length, not by searching for pad ids)."""
    lengths = rollout.response_mask.sum(1).tolist()
    texts = []
    for row, n, eos in zip(rollout.response_ids.tolist(), lengths, rollout.has_eos.tolist()):
        texts.append(tokenizer.decode(row[: n - 1 if eos else n], skip_special_tokens=False))
    return texts
