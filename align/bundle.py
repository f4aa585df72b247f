"""The four models of PPO, owned by one object that hides where each lives.

| role      | trains | is                                                                     |
| --------- | ------ | ---------------------------------------------------------------------- |
| actor     | yes    | the SFT model (full weights, or a LoRA adapter on it)                  |
| critic    | yes    | a scalar head on a backbone (the reward model's or the SFT model's)    |
| reward    | no     | a reward model, or a Python function of (prompts, responses)           |
| reference | no     | the SFT model: a frozen copy (`full`), or the actor with its adapter   |
|           |        | disabled (`lora`: no second copy of the weights exists)                |

Each role has one small function: `policy_logprobs`, `reference_logprobs`, `values`,
`reward_scores`. Sequences are `[left-padded prompt | right-padded response]`; position ids come
from the attention mask so padding never shifts positions.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from align.config import LoraConfig, ModelConfig, PPOConfig
from align.errors import AlignError
from align.generation import Rollout
from align.modeling import (ScoreModel, disable_dropout, last_token_index, load_pretrained, load_score_model,
                            load_tokenizer, load_trainable, resolve_model_path)
from align.ops import selective_log_softmax

RewardFn = Callable[[list[str], list[str]], list[float]]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_logits(model: Any, rollout_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                    temperature: float) -> torch.Tensor:
    """(B, P+R) sequences -> (B, R, V) temperature-scaled logits that predict each response token.

    The logit at position t predicts token t+1, so response token j (at P+j) is predicted at
    P+j-1. Dividing by the sampling temperature makes the scored distribution the sampled one.
    Where the model supports it (`logits_to_keep`, most causal LMs in transformers), only those
    R + 1 positions go through the output head: with a real vocabulary the (B, P+R, V) logits of
    the prompt are most of the head's compute and of the peak memory (docs/performance.md).
    """
    kwargs = {"logits_to_keep": rollout_ids.shape[1] - prompt_width + 1} if _keeps_logits(model) else {}
    out = model(input_ids=rollout_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False, **kwargs)
    logits = out.logits if kwargs else out.logits[:, prompt_width - 1:]
    return logits[:, :-1].float() / temperature


def _keeps_logits(model: Any) -> bool:
    """Whether the causal LM under any DDP or peft wrapper takes `logits_to_keep`."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def load_reward_function(spec: str, key: str) -> RewardFn:
    """Import `module:function`."""
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
                 normalize: bool = True, key: str = "reward"):
        self.spec, self.fn, self.model, self.bias = function, None, None, 0.0
        self.device = device
        if function:
            self.fn = load_reward_function(function, f"{key}.function")
            return
        if model is None:
            raise AlignError(f"set one of config keys '{key}.model' and '{key}.function'")
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
        norm = Path(path) / "align_reward.json"
        if normalize and norm.is_file():
            self.bias = float(json.loads(norm.read_text())["bias"])

    @classmethod
    def from_ppo(cls, cfg: PPOConfig, tokenizer: Any, device: torch.device) -> "Reward":
        rc = cfg.reward
        return cls(tokenizer, device, model=rc.model, function=rc.function, dtype=cfg.model.dtype,
                   on_cpu=rc.device == "cpu", offload=rc.offload, normalize=rc.normalize)

    @torch.no_grad()
    def scores(self, prompt_texts: list[str], response_texts: list[str], rollout: Rollout,
               policy_prompt_texts: list[str]) -> torch.Tensor:
        """(B,) scores for a rollout. Functions see the raw prompt and the response text; a reward
        model sees the same ids as the policy (or a re-tokenization of the text, vocabularies
        differing)."""
        if self.fn is not None:
            return call_reward_function(self.fn, self.spec, prompt_texts, response_texts).to(self.device)
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


@dataclass
class ModelBundle:
    """Actor, critic, reward and reference, with one function per role."""

    actor: Any
    critic: ScoreModel
    reward: Reward
    reference: Any | None
    """The frozen SFT copy in `full` mode; None in `lora` mode (the actor without its adapter)."""
    temperature: float

    def policy_logprobs(self, actor: Any, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-probs of the sampled response tokens under `actor` (the prepared, possibly
        DDP-wrapped, actor when training), and the (B, R, V) logits they came from."""
        logits = response_logits(actor, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1],
                                 self.temperature)
        return selective_log_softmax(logits, rollout.response_ids), logits

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, unwrapped_actor: Any) -> torch.Tensor:
        """(B, R) log-probs under the frozen SFT policy."""
        if self.reference is not None:
            model, ctx = self.reference, contextlib.nullcontext()
        else:
            model, ctx = unwrapped_actor, unwrapped_actor.disable_adapter()
        with ctx:
            logits = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1],
                                     self.temperature)
        return selective_log_softmax(logits, rollout.response_ids)

    def values(self, critic: Any, rollout: Rollout) -> torch.Tensor:
        """(B, R) value of the state before each response token (read where that token is predicted)."""
        mask = rollout.attention_mask
        v = critic(rollout.input_ids, mask, position_ids(mask))  # (B, P+R)
        return v[:, rollout.prompt_ids.shape[1] - 1:-1]


def build_bundle(cfg: PPOConfig, tokenizer: Any, device: torch.device, resume_from: Path | None) -> ModelBundle:
    """Load the four roles per `cfg.memory_mode`; with `resume_from`, actor and critic come from
    that checkpoint (the reference always from the SFT model)."""
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.memory_mode == "lora"})
    actor_ckpt = resume_from / "actor" if resume_from is not None else None
    actor = load_trainable(AutoModelForCausalLM, cfg.model, lora, tokenizer, device, actor_ckpt)
    reference = None
    if cfg.memory_mode == "full":
        reference = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=False, device=device)
    critic_path = cfg.critic.path or cfg.reward.model or cfg.model.path
    critic_lora = LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.critic.lora})
    critic = load_score_model(cfg.model, critic_lora, tokenizer, device,
                              resume_from / "critic" if resume_from is not None else None, path=critic_path)
    if cfg.model.disable_dropout:
        # Again after LoRA: peft's lora_dropout layers did not exist when the weights were loaded,
        # and any dropout makes the old and new log-probs of the first update differ (ratio != 1).
        disable_dropout(actor)
        disable_dropout(critic)
    reward = Reward.from_ppo(cfg, tokenizer, device)
    return ModelBundle(actor, critic, reward, reference, cfg.ppo.temperature)
