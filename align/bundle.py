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
import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import LoraConfig, RLConfig
from align.generation import Rollout
from align.errors import AlignError
from align.modeling import (ScoreModel, disable_dropout, inspect_model, load_pretrained, load_score_model,
                            load_tokenizer, load_trainable, parameter_counts)
from align.ops import selective_log_softmax
from align.reward import Reward, load_reward_function, position_ids


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


def response_logits_and_hidden(model: Any, rollout_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logits` and, from the same forward, the (B, R, H) last hidden states at the positions
    that predict each response token (where a shared value head reads the state's value)."""
    kwargs = {"logits_to_keep": rollout_ids.shape[1] - prompt_width + 1} if _keeps_logits(model) else {}
    out = model(input_ids=rollout_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False, output_hidden_states=True, **kwargs)
    logits = out.logits if kwargs else out.logits[:, prompt_width - 1:]
    hidden = out.hidden_states[-1][:, prompt_width - 1:-1]  # (B, R, H)
    return logits[:, :-1].float() / temperature, hidden


class ValueHead(torch.nn.Module):
    """`critic.share_actor`: a scalar head on the actor's last hidden state (trlX, LLaMA-Factory),
    initialised like a reward model's score head (std 1 / sqrt(H + 1))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1 / (hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, R, H) -> (B, R)
        return self.linear(hidden.float()).squeeze(-1)


def _keeps_logits(model: Any) -> bool:
    """Whether the causal LM under any DDP or peft wrapper takes `logits_to_keep`."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@dataclass
class ModelBundle:
    """Actor, critic, reward and reference, with one function per role."""

    actor: Any
    critic: ScoreModel | None
    """None for the critic-free estimators."""
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

    def policy_logprobs_and_values(self, actor: Any, head: Any, rollout: Rollout
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`critic.share_actor`: (B, R) log-probs, (B, R, V) logits and (B, R) values of a value head
        on the actor's trunk, from one forward."""
        logits, hidden = response_logits_and_hidden(actor, rollout.input_ids, rollout.attention_mask,
                                                    rollout.prompt_ids.shape[1], self.temperature)
        return selective_log_softmax(logits, rollout.response_ids), logits, head(hidden)

    def values(self, critic: Any, rollout: Rollout) -> torch.Tensor:
        """(B, R) value of the state before each response token (read where that token is predicted)."""
        mask = rollout.attention_mask
        v = critic(rollout.input_ids, mask, position_ids(mask))  # (B, P+R)
        return v[:, rollout.prompt_ids.shape[1] - 1:-1]


def check_models(cfg: RLConfig, tokenizer: Any) -> dict[str, Any]:
    """Check every model input without loading a weight: actor, critic and reward model paths
    (config and weight files), the reward function's import, and vocabularies. A reward model
    whose vocabulary differs from the actor's scores through text (responses decoded and
    re-tokenized: `text_bridge`); the critic reads the actor's ids, so it must share its vocabulary."""
    trust, vocab = cfg.model.trust_remote_code, tokenizer.get_vocab()
    found: dict[str, Any] = {"actor": inspect_model(cfg.model.path, "model.path", trust), "text_bridge": False}
    critic_key = "critic.path" if cfg.critic.path else "reward.model" if cfg.reward.model else "model.path"
    critic_path = critic_backbone(cfg)
    if critic_path is not None:
        found["critic"] = inspect_model(critic_path, critic_key, trust)
    if cfg.reward.function:
        load_reward_function(cfg.reward.function, "reward.function")
    else:
        found["reward"] = inspect_model(cfg.reward.model, "reward.model", trust)
        found["text_bridge"] = load_tokenizer(cfg.reward.model, key="reward.model").get_vocab() != vocab
    if critic_path not in (None, cfg.model.path) and load_tokenizer(critic_path, key=critic_key).get_vocab() != vocab:
        raise AlignError(f"config key '{critic_key}': the critic would start from '{critic_path}', whose vocabulary "
                         f"differs from the actor's; set critic.path to the SFT model ('{cfg.model.path}')")
    return found


def rl_plan(cfg: RLConfig, stage: str, found: dict[str, Any], data: str, n_steps: int,
            global_batch: int) -> dict[str, Any]:
    """What an RL run would do (`--dry-run`). Checkpoint: actor (and critic) float32 weights (4 bytes
    per parameter, per adapter parameter with LoRA) plus AdamW's moments (8 bytes per trained one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.memplan import dry_run_line

    trust = cfg.model.trust_remote_code
    lora = cfg.memory_mode == "lora"
    a_total, a_trained = parameter_counts(found["actor"], AutoModelForCausalLM,
                                          LoraConfig(**{**cfg.lora.__dict__, "enabled": lora}), trust)
    c_total = c_trained = 0
    if "critic" in found:
        critic_config = copy.deepcopy(found["critic"])
        critic_config.num_labels = 1
        c_total, c_trained = parameter_counts(critic_config, AutoModelForSequenceClassification,
                                              LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.critic.lora}), trust)
    saved = 4 * ((a_trained if lora else a_total) + (c_trained if cfg.critic.lora else c_total))
    reward = cfg.reward.function or cfg.reward.model
    p = cfg.ppo
    return {"stage": stage, "output_dir": cfg.output_dir, "actor": f"{cfg.model.path} ({cfg.memory_mode} mode)",
            "reference": "the actor with its adapter disabled" if lora else f"{cfg.model.path} (a frozen copy)",
            "critic": critic_backbone(cfg) or ("a value head on the actor (critic.share_actor)"
                                               if cfg.critic.share_actor else "none (critic-free)"),
            "reward": reward + (" (different vocabulary: scored through text)" if found["text_bridge"] else ""),
            "estimator": f"{p.estimator}; {p.n_samples_per_prompt} responses per prompt; KL {p.kl_kind} in the "
                         f"{'loss' if p.kl_in_loss else 'reward'} (coef {p.kl_coef}"
                         f"{f', adaptive to {p.kl_target}' if p.kl_target else ''}); clip [{1 - p.clip_eps:g}, "
                         f"{1 + (p.clip_eps_high or p.clip_eps):g}]{f', dual clip {p.clip_c}' if p.clip_c else ''}; "
                         f"loss {p.loss_agg}; whiten advantages {p.whiten}; dynamic sampling {p.dynamic_sampling}",
            "actor_parameters": a_total, "actor_trained_parameters": a_trained, "critic_parameters": c_total,
            "critic_trained_parameters": c_trained, "data": data, "steps": n_steps, "episodes_per_step": global_batch,
            "checkpoint_bytes": saved + 8 * (a_trained + c_trained),
            "final_model_bytes": 4 * (a_trained if lora and not cfg.lora.merge else a_total),
            "memory": dry_run_line(stage, cfg)}


def critic_backbone(cfg: RLConfig) -> str | None:
    """The critic's starting backbone: `critic.path`, else the reward model, else the SFT model;
    None for the critic-free estimators, which load no critic."""
    from align.rl import get_estimator

    if not get_estimator(cfg.ppo.estimator).needs_critic or cfg.critic.share_actor:
        return None
    return cfg.critic.path or cfg.reward.model or cfg.model.path


def build_bundle(cfg: RLConfig, tokenizer: Any, device: torch.device, resume_from: Path | None) -> ModelBundle:
    """Load the four roles per `cfg.memory_mode`; with `resume_from`, actor and critic come from
    that checkpoint (the reference always from the SFT model)."""
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.memory_mode == "lora"})
    actor_ckpt = resume_from / "actor" if resume_from is not None else None
    actor = load_trainable(AutoModelForCausalLM, cfg.model, lora, tokenizer, device, actor_ckpt)
    reference = None
    if cfg.memory_mode == "full":
        reference = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=False, device=device)
    critic_path, critic = critic_backbone(cfg), None
    if critic_path is not None and not cfg.critic.share_actor:
        critic_lora = LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.critic.lora})
        critic = load_score_model(cfg.model, critic_lora, tokenizer, device,
                                  resume_from / "critic" if resume_from is not None else None, path=critic_path)
    if cfg.model.disable_dropout:
        # Again after LoRA: peft's lora_dropout layers did not exist when the weights were loaded,
        # and any dropout makes the old and new log-probs of the first update differ (ratio != 1).
        for model in (actor, critic):
            if model is not None:
                disable_dropout(model)
    reward = Reward.from_ppo(cfg, tokenizer, device)
    return ModelBundle(actor, critic, reward, reference, cfg.ppo.temperature)
