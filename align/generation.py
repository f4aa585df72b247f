"""Batched sampling shared by `align generate`, PPO rollouts and evaluation.

Prompts are left-padded so every row's next token sits in the same column, and the KV cache
(transformers' `generate`) makes each new token cost one position, not the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.rl import truncate_after_eos


@dataclass
class Rollout:
    """Prompts and sampled responses, both as padded id tensors with lengths.

    prompt_ids:      (B, P) left-padded
    prompt_mask:     (B, P) 1 on real prompt tokens
    response_ids:    (B, R) right-padded after the first EOS (EOS included in the response)
    response_mask:   (B, R) 1 on response tokens up to and including EOS
    has_eos:         (B,)   False where the response ran out of room before EOS
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows `index` (a minibatch), keeping the padded widths."""
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.has_eos[index])

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


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


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, top_k: int = 0, top_p: float = 1.0) -> Rollout:
    """Sample one response per prompt. Pure temperature sampling by default (top_k 0, top_p 1),
    because PPO scores the responses under the same temperature-scaled distribution and any other
    filter would make the sampler differ from the policy being optimised."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    kwargs: dict[str, Any] = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True, **kwargs)
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
