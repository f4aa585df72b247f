"""The reward a policy is trained and evaluated on: a reward model or a Python function, and the one
function that turns its raw scores into training scores.

Every consumer goes through this module, so two methods can never see different rewards:
PPO and every online method of the RL loop (`Reward.training_scores`), best-of-n sampling (which
keeps the candidate with the highest training score) and `align eval` (which reports the raw
score: the reward model's judgement, the same whatever a method's shaping settings).

Raw score: a reward model's output at the last real token of `[BOS] prompt response [EOS]` minus
the bias stored by `align rm --set normalize_with=...` (so SFT responses score 0 on average; see
NORMALIZATION_FILE for the part folded into the head), or a function's float. Training score
(`shape_scores`, in this order):
1. the missing-EOS penalty: a response that ran out of room before EOS loses
   `missing_eos_penalty` (the "EOS trick", Huang et al. 2024);
2. the overlong penalty: a soft, linear penalty over the last `overlong_buffer` tokens of the
   length budget (DAPO's soft overlong punishment, Yu et al. 2025);
3. the clip to [-clip, clip], last, so the bound holds for what the optimiser sees.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from align.errors import AlignError
from align.generation import Rollout

RewardFn = Callable[[list[str], list[str]], list[float]]
NORMALIZATION_FILE = "align_reward.json"
"""Written by `align rm` beside the reward model: `bias`, what to subtract from the saved classifier's
output to get the normalised score, and `folded_into_head`, the part of the normalisation already
subtracted inside the score head's bias (0 for heads without one, most: `fold_score_offset`), which
an unnormalised score (`normalize: false`) adds back. Files without it folded nothing."""


@dataclass(frozen=True)
class Shaping:
    """How raw scores become training scores (see the module docstring for the order)."""

    missing_eos_penalty: float | None = None
    overlong_buffer: int | None = None
    overlong_penalty: float = 1.0
    max_length: int | None = None
    """The response length budget the overlong penalty counts back from (the rollout's)."""
    clip: float | None = None


def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, lengths: torch.Tensor, shaping: Shaping) -> torch.Tensor:
    """(B,) raw scores -> (B,) training scores. `has_eos` (B,) bool: the response ended with EOS;
    `lengths` (B,) response tokens (EOS included). Pure: the same inputs give the same scores in
    every method (tests/test_reward.py feeds one batch through every consumer)."""
    scores = raw.float()
    if shaping.missing_eos_penalty is not None:
        scores = torch.where(has_eos.to(scores.device), scores, scores - shaping.missing_eos_penalty)
    if shaping.overlong_buffer:
        from align.rl import overlong_penalty

        scores = scores + overlong_penalty(lengths.to(scores.device), shaping.max_length, shaping.overlong_buffer,
                                           shaping.overlong_penalty)
    if shaping.clip is not None:
        scores = scores.clamp(-shaping.clip, shaping.clip)
    return scores


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def load_reward_function(spec: str, key: str) -> RewardFn:
    """Import `module:function`. Importing runs the module's code: a reward function is trusted
    code, like `trust_remote_code` (docs/failures.md)."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise AlignError(f"config key '{key}' must be 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise AlignError(f"config key '{key}': cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise AlignError(f"config key '{key}': {spec!r} is not callable")
    return fn


def call_reward_function(fn: RewardFn, spec: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Call a reward function and check what it returns: one finite float per response."""
    try:
        out = list(fn(prompts, responses))
    except Exception as e:  # a user's function: report it as their error, in one line
        raise AlignError(f"reward function {spec} raised {type(e).__name__}: {e}") from None
    if len(out) != len(responses):
        raise AlignError(f"reward function {spec} returned {len(out)} scores for {len(responses)} responses")
    try:
        scores = torch.tensor([float(x) for x in out], dtype=torch.float32)
    except (TypeError, ValueError):
        raise AlignError(f"reward function {spec} returned a value that is not a number") from None
    if not torch.isfinite(scores).all():
        raise AlignError(f"reward function {spec} returned a non-finite score")
    return scores


class Reward:
    """The frozen reward: a reward model read at the last real token, or a function of text."""

    def __init__(self, tokenizer: Any, device: torch.device, *, model: str | None = None,
                 function: str | None = None, dtype: str = "auto", on_cpu: bool = False, offload: bool = False,
                 normalize: bool = True, key: str = "reward", shaping: Shaping = Shaping()):
        from align.modeling import ScoreModel, load_pretrained, load_tokenizer, resolve_model_path

        self.spec, self.fn, self.model, self.bias = function, None, None, 0.0
        self.device, self.shaping = device, shaping
        if function:
            self.fn = load_reward_function(function, f"{key}.function")
            return
        if model is None:
            raise AlignError(f"set one of config keys '{key}.model' and '{key}.function'")
        from align.config import ModelConfig

        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path)
        # Same vocabulary: score the policy's ids directly. Otherwise bridge through text.
        self.same_vocab = self.tokenizer.get_vocab() == tokenizer.get_vocab()
        from transformers import AutoModelForSequenceClassification

        self.home = torch.device("cpu") if on_cpu or offload else device
        mcfg = ModelConfig(path=path, dtype=dtype, disable_dropout=True)
        self.model = ScoreModel(load_pretrained(AutoModelForSequenceClassification, mcfg, self.tokenizer,
                                                trainable=False, device=self.home, num_labels=1))
        self.offload = offload
        norm = Path(path) / NORMALIZATION_FILE
        if norm.is_file():
            saved = json.loads(norm.read_text())
            self.bias = float(saved["bias"]) if normalize else -float(saved.get("folded_into_head", 0.0))

    @classmethod
    def from_ppo(cls, cfg: Any, tokenizer: Any, device: torch.device) -> "Reward":
        """The reward of an online-RL config (`reward` section; the length budget from `ppo`)."""
        rc = cfg.reward
        shaping = Shaping(missing_eos_penalty=rc.missing_eos_penalty, overlong_buffer=rc.overlong_buffer,
                          overlong_penalty=rc.overlong_penalty, max_length=cfg.ppo.response_length, clip=rc.clip)
        return cls(tokenizer, device, model=rc.model, function=rc.function, dtype=cfg.model.dtype,
                   on_cpu=rc.device == "cpu", offload=rc.offload, normalize=rc.normalize, shaping=shaping)

    @torch.no_grad()
    def scores(self, prompt_texts: list[str], response_texts: list[str], rollout: Rollout,
               policy_prompt_texts: list[str]) -> torch.Tensor:
        """(B,) raw scores for a rollout. Functions see the raw prompt and the response text; a
        reward model sees the same ids as the policy (or a re-tokenization of the text,
        vocabularies differing)."""
        if self.fn is not None:
            return call_reward_function(self.fn, self.spec, prompt_texts, response_texts).to(self.device)
        from align.modeling import last_token_index

        if self.same_vocab:
            ids, mask = rollout.input_ids, rollout.attention_mask
        else:
            from align.generation import left_pad

            # Prompt texts come without special tokens (the reward tokenizer adds its own); EOS is
            # appended only to responses that ended, as in the same-vocabulary path.
            eos = self.tokenizer.eos_token or ""
            texts = [p + r + (eos if ended else "")
                     for p, r, ended in zip(policy_prompt_texts, response_texts, rollout.has_eos.tolist())]
            seqs = [self.tokenizer(t, add_special_tokens=True).input_ids for t in texts]
            ids, mask = left_pad(seqs, self.tokenizer.pad_token_id, rollout.input_ids.device)
        run_on = self.device if self.offload else self.home
        if self.offload:
            self.model.to(run_on)
        scores = self.model(ids.to(run_on), mask.to(run_on), position_ids(mask).to(run_on))  # (B, T)
        scores = scores.gather(1, last_token_index(mask.to(run_on))[:, None]).squeeze(1) - self.bias
        if self.offload:
            self.model.to(self.home)
        return scores.to(self.device)

    def training_scores(self, prompt_texts: list[str], response_texts: list[str], rollout: Rollout,
                        policy_prompt_texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw (B,), training (B,)) scores of a rollout: `scores` then `shape_scores`."""
        raw = self.scores(prompt_texts, response_texts, rollout, policy_prompt_texts)
        return raw, shape_scores(raw, rollout.has_eos, rollout.response_mask.sum(1), self.shaping)
