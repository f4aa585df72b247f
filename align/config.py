"""Typed configuration: one dataclass per command, loaded from YAML with `--set key=value` overrides.

Every YAML key maps one-to-one onto a dataclass field. Loading checks, in order: unknown keys (the
message names the nearest valid key), types (from the field annotations), then each config's
`validate()` for impossible values (negative lr, warmup longer than training, LoRA rank 0).
Every error is an `AlignError` naming the dotted key. The resolved config is frozen after loading
by convention: stages read it, they never write to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Sections shared by several commands


@dataclass
class ModelConfig:
    """Which model to start from and how to hold it."""

    path: str = ""
    """Local directory (a run directory of an earlier stage works too) or hub id. Required."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of frozen models. `auto`: bfloat16 on a GPU that supports it, else float32.
    Trained weights always stay float32; `train.mixed_precision` sets the compute dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (RLHF needs it: dropout makes log-probs of the same
    tokens differ between passes, so the PPO ratio and the KL would not start at 1 and 0)."""
    trust_remote_code: bool = False
    """Passed to from_pretrained: allow running model code shipped with a hub checkpoint."""
    attn_implementation: str | None = None
    """Passed to from_pretrained (`sdpa`, `eager`, `flash_attention_2`); None lets transformers pick."""


@dataclass
class LoraConfig:
    """LoRA through peft. With `enabled: false` the whole model is trained."""

    enabled: bool = False
    """Train a LoRA adapter on a frozen base instead of every weight."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft's `lora_dropout`)."""
    target: str | list[str] = "all"
    """`all` = every linear layer except the output head (peft's `all-linear`), or module names."""
    merge: bool = False
    """Merge the adapter into the base weights in the final model (a plain causal LM), instead of
    saving the adapter alone."""


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens."""

    train: str = ""
    """A .json/.jsonl/.csv/.parquet file, or a hub dataset name. Required."""
    validation: str | None = None
    """A validation file; when absent, `val_fraction` of train is held out."""
    val_fraction: float = 0.05
    """Fraction of train records held out for validation when `validation` is not given (chosen by
    a shuffle seeded with `seed`, at least one record); 0 means no validation."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: Literal["auto", "alpaca", "prompt_response", "prompt_completion", "chat", "preference", "prompt"] = "auto"
    """Record format; `auto` detects it from the first record's keys."""
    prompt_template: str = "{prompt}"
    """Wraps the prompt; may use `{prompt}`, and for Alpaca records `{instruction}` and `{input}`.
    Not used for chat records (the tokenizer's chat template renders those)."""
    max_length: int = 512
    """Longest tokenized example (prompt + response + EOS)."""
    truncation: Literal["drop", "truncate", "error"] = "drop"
    """Over-long examples: drop them, cut the response to fit, or stop with an error. Counted and
    reported either way."""
    max_samples: int | None = None
    """Use only the first N records (for smoke runs)."""


@dataclass
class TrainConfig:
    """The optimisation loop shared by the SFT and reward-model stages."""

    epochs: float = 1.0
    """Passes over the training set; fractions allowed. Steps = epochs x (examples // global
    batch): each epoch's last partial global batch is skipped."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size x grad_accum x processes."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay, on parameters with 2+ dimensions (weight matrices, embeddings) only;
    biases and norm weights are never decayed."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's [beta1, beta2]."""
    warmup_steps: int = 0
    """Linear warmup, then cosine decay to `min_lr_ratio` x lr."""
    min_lr_ratio: float = 0.0
    """The learning rate the cosine decay ends at, as a fraction of `lr`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before every optimizer step."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute dtype through accelerate. `auto`: bf16 on a GPU that supports it, else none."""
    eval_every: int = 50
    """Evaluate on the validation set every N optimizer steps, and after the last one."""
    log_every: int = 10
    """Append training metrics (averaged since the last log) to metrics.jsonl every N optimizer
    steps, and after the last one."""
    save_every: int = 200
    """Write a resumable checkpoint every N optimizer steps (none after the last step: the final
    model is written then)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a new best validation loss."""
    max_nonfinite_steps: int = 3
    """A step with a non-finite loss or gradient is skipped; this many in a row stop the run."""
    max_eval_batches: int | None = None
    """Cap on validation batches per evaluation (None: the whole validation set)."""
    padding_free: bool | None = None
    """SFT only: pack each micro-batch's examples into rows (position ids restarting per example, no
    padding between them) instead of padding every example to the longest. Same loss, fewer tokens
    computed when lengths vary. It needs a model whose attention keeps packed examples apart
    (transformers' `create_causal_mask`: Llama, Mistral, Qwen2, Gemma, GPT-2 and most others; not
    OPT or Bloom), which is checked on the loaded model. None: pack when that check passes, else pad;
    true: pack, and stop if the check fails; false: pad."""


# ----------------------------------------------------------------------------------------------
# One config per command


@dataclass
class SFTConfig:
    """`align sft`: supervised fine-tuning with masked NLL on response tokens."""

    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/, summary.json. Required."""
    seed: int = 42
    """Seeds python, numpy and torch, the validation hold-out and each epoch's example order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))

    def validate(self) -> None:
        _require(self, ["output_dir", "model.path", "data.train"])
        validate_common(self)


@dataclass
class RMConfig:
    """`align rm`: a reward model from preference pairs, trained with the Bradley-Terry loss."""

    output_dir: str = ""
    """Run directory; the reward model is written to `<output_dir>/model`. Required."""
    seed: int = 42
    """Seeds the data order, the validation split and the score head."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone: usually the SFT run directory."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the backbone (the score head is always trained in full). The final model is always
    saved merged, so it loads as a plain sequence classifier."""
    data: DataConfig = field(default_factory=lambda: DataConfig(format="auto"))
    """Preference pairs `{prompt, chosen, rejected}`; `data.prompt_template` must match SFT's."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    """Optimisation; `batch_size` counts pairs."""
    margin: float = 0.0
    """Loss margin: -log sigmoid(r_chosen - r_rejected - margin)."""
    normalize_with: str | None = None
    """A `{prompt, response}` file (e.g. the SFT validation data). After training, the mean score
    of its responses is stored with the model and subtracted at scoring time, so such responses
    score 0 on average. None: no normalisation."""

    def validate(self) -> None:
        _require(self, ["output_dir", "model.path", "data.train"])
        if self.train.padding_free:
            raise ConfigError("config key 'train.padding_free' applies to SFT only; the reward model pads its pairs")
        validate_common(self)


@dataclass
class CriticConfig:
    """The trained value model: a scalar head on a backbone, read at every response token."""

    path: str | None = None
    """Backbone to start from: the reward model (the default when `reward.model` is set, as in
    Ouyang et al. 2022) or the SFT model (`model.path`, the default otherwise)."""
    lr: float = 1e-5
    """Critic learning rate (its own AdamW and schedule)."""
    lora: bool = False
    """Train the critic through a LoRA adapter (same settings as the actor's `lora` section)."""


@dataclass
class RewardConfig:
    """The frozen reward: a reward model run, or a Python function."""

    model: str | None = None
    """Reward model path (an `align rm` run directory works). One of `model` or `function`."""
    function: str | None = None
    """`module:function` taking (prompts: list[str], responses: list[str]) and returning floats."""
    device: Literal["auto", "cpu"] = "auto"
    """Where the reward model lives: with the policy (`auto`) or always on CPU."""
    offload: bool = False
    """Keep the reward model on CPU and move it to the accelerator only while scoring."""
    normalize: bool = True
    """Subtract the bias stored by `align rm --set normalize_with=...`, if any."""
    clip: float | None = None
    """Clip scores to [-clip, clip] before they enter the reward."""
    whiten: bool = False
    """Whiten the per-token rewards over the batch before GAE (scale only, mean kept)."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that ran out of room before EOS (the EOS trick,
    Huang et al. 2024); None disables it."""


@dataclass
class PPOLoopConfig:
    """Rollout and optimisation settings of PPO; names follow the PPO paper and TRL."""

    total_episodes: int = 1024
    """Responses to sample over the whole run; steps = total_episodes / (rollout_batch_size x processes)."""
    rollout_batch_size: int = 64
    """Prompts sampled per step, per process."""
    mini_batch_size: int = 16
    """Responses per PPO update (one optimizer step), per process."""
    micro_batch_size: int = 16
    """Responses per forward/backward; mini_batch_size / micro_batch_size is the gradient accumulation."""
    fuse_scoring: bool = True
    """When one forward covers the rollout (mini_batch_size and micro_batch_size >= rollout_batch_size),
    take the old log-probs and values from the first update's forward rather than a separate pass:
    the weights have not changed yet, so the numbers are the same, and a step does two fewer forwards."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, reshuffled each time."""
    response_length: int = 32
    """Most new tokens per response."""
    temperature: float = 0.7
    """Sampling temperature; the same scaling is applied to the logits when scoring."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(actor || reference) (Schulman, Approximating KL divergence)."""
    kl_coef: float = 0.05
    """beta: weight of the KL penalty in the per-token reward (initial value when adaptive)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al. 2019): steer beta so the sequence KL approaches this. None: fixed beta."""
    kl_horizon: int = 10000
    """Adaptive KL horizon, in episodes."""
    gamma: float = 1.0
    """GAE discount factor over response tokens (1: no discounting)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens."""
    clip_eps: float = 0.2
    """Policy ratio clip range."""
    value_clip_eps: float | None = 0.2
    """Value clip range around the rollout's values; None disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    lr: float = 3e-6
    """Actor learning rate; decays linearly to 0 over the run (as in TRL and CleanRL)."""
    weight_decay: float = 0.0
    """AdamW weight decay of actor and critic, on parameters with 2+ dimensions only."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's [beta1, beta2], for actor and critic."""
    max_grad_norm: float = 1.0
    """Gradient clipping, per model."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute dtype through accelerate. `auto`: bf16 on a GPU that supports it, else none."""
    log_every: int = 1
    """Append metrics to metrics.jsonl every N PPO steps, and after the last one."""
    sample_every: int = 10
    """Every N steps, log a few prompt/response/score rows (to the console and samples.jsonl)."""
    samples_logged: int = 4
    """How many prompt/response/score rows each `sample_every` log holds."""
    eval_every: int = 20
    """Every N steps (and at the end), greedy responses on the eval prompts, scored."""
    save_every: int = 50
    """Write a resumable checkpoint every N PPO steps (none after the last step: the final model
    is written then)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted."""
    max_nonfinite_steps: int = 3
    """An update with a non-finite loss or gradient is skipped; this many steps in a row stop the run."""
    warn_kl: float = 20.0
    """Warn (and flag `guard/kl_high` in the metrics) when objective/kl exceeds this."""
    warn_clipfrac: float = 0.4
    """Warn (`guard/clipfrac_high`) when policy/clipfrac_avg exceeds this: updates too large."""
    warn_value_loss: float = 100.0
    """Warn (`guard/value_loss_high`) when loss/value_avg exceeds this: the critic is lost."""
    warn_length_ratio: float = 3.0
    """Warn (`guard/length_drift`) when the mean response length falls below 1/ratio or rises
    above ratio times the first step's: a common sign of reward hacking."""


@dataclass
class PPOEvalConfig:
    """The held-out evaluation run during PPO."""

    prompts: str | None = None
    """Eval prompt file; None disables the evaluation hook."""
    gold_reward: str | None = None
    """`module:function` gold reward, reported beside the learned one and never used in training."""
    max_samples: int | None = 200
    """Use only the first N eval prompts (None: all of them)."""


@dataclass
class PPOConfig:
    """`align ppo`: RLHF with PPO; actor and reference from the SFT model, a critic, a frozen reward."""

    output_dir: str = ""
    """Run directory; the actor is written to `<output_dir>/model`. Required."""
    seed: int = 42
    """Seeds the prompt order and the sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT model: the actor starts from it and the reference is it, frozen."""
    memory_mode: Literal["full", "lora"] = "full"
    """`full`: actor and reference are separate copies. `lora`: one base model; the actor is a LoRA
    adapter on it and the reference is the same base with the adapter disabled (no second copy)."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False))
    """Adapter settings for `memory_mode: lora` (and a LoRA critic); `lora.enabled` is implied."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    """Prompt set (any SFT format, or `{prompt}`); `max_length` is the longest prompt kept, and
    `prompt_template` must be SFT's so the actor sees what it was trained on."""
    ppo: PPOLoopConfig = field(default_factory=PPOLoopConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)

    def validate(self) -> None:
        _require(self, ["output_dir", "model.path", "data.train"])
        if (self.reward.model is None) == (self.reward.function is None):
            raise ConfigError("set exactly one of config keys 'reward.model' and 'reward.function'")
        p = self.ppo
        checks = [
            ("ppo.total_episodes", p.total_episodes >= 1, "must be >= 1"),
            ("ppo.rollout_batch_size", p.rollout_batch_size >= 1, "must be >= 1"),
            ("ppo.mini_batch_size", 1 <= p.mini_batch_size <= p.rollout_batch_size
             and p.rollout_batch_size % p.mini_batch_size == 0, "must divide ppo.rollout_batch_size"),
            ("ppo.micro_batch_size", 1 <= p.micro_batch_size <= p.mini_batch_size
             and p.mini_batch_size % p.micro_batch_size == 0, "must divide ppo.mini_batch_size"),
            ("ppo.total_episodes", p.total_episodes >= p.rollout_batch_size,
             f"must be at least one rollout batch ({p.rollout_batch_size})"),
            ("ppo.ppo_epochs", p.ppo_epochs >= 1, "must be >= 1"),
            ("ppo.response_length", p.response_length >= 1, "must be >= 1"),
            ("ppo.temperature", p.temperature > 0, "must be > 0"),
            ("ppo.kl_coef", p.kl_coef >= 0, "must be >= 0"),
            ("ppo.kl_target", p.kl_target is None or p.kl_target > 0, "must be > 0"),
            ("ppo.kl_horizon", p.kl_horizon >= 1, "must be >= 1"),
            ("ppo.gamma", 0 <= p.gamma <= 1, "must be in [0, 1]"),
            ("ppo.lam", 0 <= p.lam <= 1, "must be in [0, 1]"),
            ("ppo.clip_eps", p.clip_eps > 0, "must be > 0"),
            ("ppo.value_clip_eps", p.value_clip_eps is None or p.value_clip_eps > 0, "must be > 0"),
            ("ppo.vf_coef", p.vf_coef >= 0, "must be >= 0"),
            ("ppo.lr", p.lr > 0, "must be > 0"),
            ("critic.lr", self.critic.lr > 0, "must be > 0"),
            ("ppo.max_grad_norm", p.max_grad_norm > 0, "must be > 0"),
            ("ppo.log_every", p.log_every >= 1, "must be >= 1"),
            ("ppo.sample_every", p.sample_every >= 1, "must be >= 1"),
            ("ppo.eval_every", p.eval_every >= 1, "must be >= 1"),
            ("ppo.save_every", p.save_every >= 1, "must be >= 1"),
            ("ppo.keep_checkpoints", p.keep_checkpoints >= 1, "must be >= 1"),
            ("reward.clip", self.reward.clip is None or self.reward.clip > 0, "must be > 0"),
            ("ppo.max_nonfinite_steps", p.max_nonfinite_steps >= 1, "must be >= 1"),
            # accelerate keeps one GradScaler for all prepared optimizers: with actor and critic
            # each clipped and stepped, fp16 would unscale twice and fail. bf16 needs no scaler.
            ("ppo.mixed_precision", p.mixed_precision != "fp16", "fp16 is not supported by PPO's two optimizers; use bf16"),
            ("ppo.warn_length_ratio", p.warn_length_ratio > 1, "must be > 1"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {_get(self, key)!r})")
        validate_common(self)


@dataclass
class EvalConfig:
    """`align eval`: the same held-out prompts through several checkpoints, one set of metrics."""

    output_dir: str = ""
    """Where `results.json` and each model's `responses/<name>.jsonl` are written. Required."""
    seed: int = 42
    """Seeds the sampled responses (KL and the optional sampled scores)."""
    models: list[str] = field(default_factory=list)
    """Checkpoints or run directories to evaluate. Required."""
    names: list[str] | None = None
    """A display name per model; default: each run directory's name."""
    reference: str | None = None
    """The reference policy for KL (the SFT model); None skips KL."""
    prompts: str = ""
    """Held-out prompt file (any prompt format); a gold reward may read an `answer` field. Required."""
    prompt_template: str = "{prompt}"
    """Must be the template the models were trained with."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are left out."""
    max_samples: int | None = None
    """Use only the first N prompts."""
    response_length: int = 32
    """Most new tokens per response."""
    reward_model: str | None = None
    """The learned reward (an `align rm` run)."""
    reward_function: str | None = None
    """Or a `module:function` reward."""
    gold_reward: str | None = None
    """`module:function` gold reward, when the task has one."""
    validation: str | None = None
    """SFT validation file (prompt/response records) for perplexity and token accuracy."""
    kl_temperature: float = 1.0
    """Temperature of the samples the KL to the reference is estimated on (1: the policy itself)."""
    sampled: bool = False
    """Also score one temperature-`kl_temperature` sample per prompt (besides the greedy response)."""
    batch_size: int = 64
    """Prompts generated for (and validation examples scored) per batch."""
    max_length: int = 512
    """Longest validation example (tokens)."""
    best_of: int | None = None
    """Also evaluate best-of-n with this n: for each model named in `best_of_models`, sample n
    responses per prompt at `best_of_temperature`, keep the one the learned reward prefers, and
    report it as a row `<name> (best-of-<n>)` with its sampling cost. Needs a learned reward."""
    best_of_models: list[str] | None = None
    """Names (see `names`) of the models to evaluate with best-of-n; default: the first model."""
    best_of_temperature: float = 1.0
    """Sampling temperature of the best-of-n candidates."""

    def validate(self) -> None:
        _require(self, ["output_dir", "prompts"])
        if not self.models:
            raise ConfigError("missing required config key 'models' (the checkpoints to evaluate)")
        if self.names is not None and len(self.names) != len(self.models):
            raise ConfigError(f"config key 'names' has {len(self.names)} names for {len(self.models)} models")
        if self.reward_model and self.reward_function:
            raise ConfigError("set at most one of config keys 'reward_model' and 'reward_function'")
        checks = [("response_length", self.response_length >= 1, "must be >= 1"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("kl_temperature", self.kl_temperature > 0, "must be > 0"),
                  ("max_samples", self.max_samples is None or self.max_samples >= 1, "must be >= 1"),
                  ("best_of", self.best_of is None or self.best_of >= 1, "must be >= 1"),
                  ("best_of_temperature", self.best_of_temperature > 0, "must be > 0")]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {_get(self, key)!r})")
        if self.best_of is not None and not (self.reward_model or self.reward_function):
            raise ConfigError("config key 'best_of' needs a reward to choose with: set 'reward_model' or "
                              "'reward_function'")
        names = self.names or [Path(m).parent.name if Path(m).name == "model" else Path(m).name for m in self.models]
        for name in self.best_of_models or []:
            if name not in names:
                raise ConfigError(f"config key 'best_of_models' names '{name}', which is not one of the models "
                                  f"({', '.join(names)})")


@dataclass
class SampleConfig:
    """`align sample`: rejection-sampled data. For each prompt, sample `best_of` responses and keep
    the one the reward prefers; write `{prompt, response, score}` JSONL, usable as SFT data."""

    model: str = ""
    """The checkpoint (or run directory) to sample from. Required."""
    prompts: str = ""
    """Prompt file (any prompt format). Required."""
    out: str = ""
    """The JSONL file to write; must not exist yet. Required."""
    best_of: int = 4
    """K: responses sampled per prompt."""
    reward_model: str | None = None
    """The reward that chooses (an `align rm` run). One of `reward_model` and `reward_function`."""
    reward_function: str | None = None
    """Or a `module:function` reward taking (prompts, responses) and returning floats."""
    normalize: bool = True
    """Subtract the bias stored with the reward model (`align rm --set normalize_with=...`), if any."""
    prompt_template: str | None = None
    """Prompt template; None: the one in the model's run config, else `{prompt}`."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are left out."""
    max_samples: int | None = None
    """Use only the first N prompts."""
    response_length: int = 32
    """Most new tokens per response."""
    temperature: float = 1.0
    """Sampling temperature."""
    batch_size: int = 16
    """Prompts per generate call (each call samples batch_size x best_of responses)."""
    seed: int = 42
    """Seeds the sampling."""

    def validate(self) -> None:
        _require(self, ["model", "prompts", "out"])
        if (self.reward_model is None) == (self.reward_function is None):
            raise ConfigError("set exactly one of config keys 'reward_model' and 'reward_function'")
        checks = [("best_of", self.best_of >= 1, "must be >= 1"),
                  ("response_length", self.response_length >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("max_samples", self.max_samples is None or self.max_samples >= 1, "must be >= 1")]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {_get(self, key)!r})")


def _check_trl_train(t: TrainConfig) -> None:
    """TrainConfig keys that TRL's trainers have no counterpart for must stay unset."""
    if t.early_stopping_patience is not None:
        raise ConfigError("config key 'train.early_stopping_patience' is not supported by the TRL stages")
    if t.max_eval_batches is not None:
        raise ConfigError("config key 'train.max_eval_batches' is not supported by the TRL stages")
    if t.padding_free:
        raise ConfigError("config key 'train.padding_free' is not supported by the TRL stages")


@dataclass
class DPOStageConfig:
    """`align dpo`: Direct Preference Optimization (Rafailov et al. 2023) through TRL's DPOTrainer, from
    the SFT model on the reward model's preference pairs; the reference is the SFT model, frozen."""

    output_dir: str = ""
    """Run directory; the policy is written to `<output_dir>/model`. Required."""
    seed: int = 42
    """Seeds the data order, the validation split and LoRA's initialisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT model: the policy starts from it and the reference is it, frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the policy; the reference is then the policy with its adapter disabled (no copy)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    """Preference pairs `{prompt, chosen, rejected}` (the reward model's); `data.prompt_template` must
    be SFT's. The template is applied here, before TRL sees the pairs (TRL does not re-template plain
    strings). Pairs longer than `max_length` are dropped (`drop`), cut by TRL from the end
    (`truncate`), or stop the run (`error`)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7))
    """Optimisation, mapped onto TRL's arguments; `batch_size` counts pairs. `max_nonfinite_steps`
    is not used (TRL has no such guard); `early_stopping_patience` and `max_eval_batches` must stay
    unset; `save_every`/`keep_checkpoints` are TRL's `save_steps`/`save_total_limit`."""
    beta: float = 0.1
    """beta of the DPO loss: how strongly the policy is held to the reference (the implicit reward is
    beta x log pi/pi_ref)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """TRL's `loss_type`: `sigmoid` is DPO's -log sigmoid(beta x margin)."""
    reference: str | None = None
    """Reference policy; None: `model.path` (the SFT model)."""

    def validate(self) -> None:
        _require(self, ["output_dir", "model.path", "data.train"])
        if self.beta <= 0:
            raise ConfigError(f"config key 'beta' must be > 0 (got {self.beta!r})")
        _check_trl_train(self.train)
        validate_common(self)


@dataclass
class GroupLoopConfig:
    """Sampling and optimisation of the group-baseline RL stages (GRPO, RLOO), named as PPO's where
    the meaning is the same, so the methods can be given the same budget."""

    total_episodes: int = 1024
    """Responses to sample over the whole run (the budget, as PPO's); steps = total_episodes /
    (rollout_batch_size x processes)."""
    rollout_batch_size: int = 64
    """Responses sampled per optimizer step, per process: rollout_batch_size / num_generations prompts."""
    num_generations: int = 8
    """G: responses per prompt; each response's baseline comes from the other responses to its prompt."""
    micro_batch_size: int = 16
    """Responses per forward/backward; rollout_batch_size / micro_batch_size is the gradient accumulation."""
    num_iterations: int = 1
    """Optimisation passes over each sampled batch (TRL's `num_iterations`, PPO's ppo_epochs)."""
    response_length: int = 32
    """Most new tokens per response."""
    temperature: float = 0.7
    """Sampling temperature (pure temperature sampling: top_k 0, top_p 1, as PPO's)."""
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (0: no reference model is loaded)."""
    clip_eps: float = 0.2
    """Policy ratio clip range (matters when num_iterations > 1)."""
    lr: float = 1e-6
    """Peak learning rate; linear warmup then cosine decay to 0."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's [beta1, beta2]."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute dtype. `auto`: bf16 on a GPU that supports it, else none."""
    log_every: int = 1
    """Append metrics to metrics.jsonl every N steps."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""


@dataclass
class _GroupStage:
    """What GRPO and RLOO share: the PPO stage's model, reward and prompts, a group sampling loop."""

    output_dir: str = ""
    """Run directory; the policy is written to `<output_dir>/model`. Required."""
    seed: int = 42
    """Seeds the prompt order and the sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT model: the policy starts from it and the reference is it, frozen."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the policy; the reference is then the policy with its adapter disabled."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward, as PPO's: a reward model (scored at the last real token, its stored bias
    subtracted) or a function. Used: model, function, normalize, clip, missing_eos_penalty."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    """The PPO prompt set; `max_length` is the longest prompt kept; `prompt_template` must be SFT's."""
    rl: GroupLoopConfig = field(default_factory=GroupLoopConfig)

    def validate(self) -> None:
        _require(self, ["output_dir", "model.path", "data.train"])
        if (self.reward.model is None) == (self.reward.function is None):
            raise ConfigError("set exactly one of config keys 'reward.model' and 'reward.function'")
        r = self.rl
        checks = [
            ("rl.total_episodes", r.total_episodes >= r.rollout_batch_size,
             f"must be at least one rollout batch ({r.rollout_batch_size})"),
            ("rl.num_generations", r.num_generations >= 2, "must be >= 2 (the baseline needs other responses)"),
            ("rl.rollout_batch_size", r.rollout_batch_size >= 1 and r.rollout_batch_size % r.num_generations == 0,
             "must be a multiple of rl.num_generations"),
            ("rl.micro_batch_size", 1 <= r.micro_batch_size <= r.rollout_batch_size
             and r.rollout_batch_size % r.micro_batch_size == 0, "must divide rl.rollout_batch_size"),
            ("rl.num_iterations", r.num_iterations >= 1, "must be >= 1"),
            ("rl.response_length", r.response_length >= 1, "must be >= 1"),
            ("rl.temperature", r.temperature > 0, "must be > 0"),
            ("rl.kl_coef", r.kl_coef >= 0, "must be >= 0"),
            ("rl.clip_eps", r.clip_eps > 0, "must be > 0"),
            ("rl.lr", r.lr > 0, "must be > 0"),
            ("rl.max_grad_norm", r.max_grad_norm > 0, "must be > 0"),
            ("rl.log_every", r.log_every >= 1, "must be >= 1"),
            ("rl.save_every", r.save_every >= 1, "must be >= 1"),
            ("rl.keep_checkpoints", r.keep_checkpoints >= 1, "must be >= 1"),
            ("reward.clip", self.reward.clip is None or self.reward.clip > 0, "must be > 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' {why} (got {_get(self, key)!r})")
        validate_common(self)


@dataclass
class GRPOStageConfig(_GroupStage):
    """`align grpo`: GRPO (Shao et al. 2024) through TRL's GRPOTrainer: G responses per prompt, the
    advantage of each is its reward minus its group's mean (scaled per `scale_rewards`)."""

    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """TRL's `loss_type`: how token losses are averaged (`grpo`: per sequence then over the batch;
    `dapo`: over all tokens of the batch; `dr_grpo`: by a constant, Liu et al. 2025)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the reward std of the group, of the batch, or not at all (Dr. GRPO)."""


@dataclass
class RLOOStageConfig(_GroupStage):
    """`align rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024) through TRL's RLOOTrainer: the
    baseline of each response is the mean reward of the other G-1 responses to its prompt; the KL
    to the reference enters the reward, summed over the response."""

    normalize_advantages: bool = False
    """Whiten advantages over the batch."""


def validate_common(cfg: Any) -> None:
    """Range checks for the sections most configs share."""
    checks: list[tuple[str, bool, str]] = []
    if hasattr(cfg, "train"):
        t = cfg.train
        checks += [
            ("train.lr", t.lr > 0, "must be > 0"),
            ("train.epochs", t.epochs > 0, "must be > 0"),
            ("train.max_steps", t.max_steps is None or t.max_steps > 0, "must be > 0"),
            ("train.batch_size", t.batch_size >= 1, "must be >= 1"),
            ("train.grad_accum", t.grad_accum >= 1, "must be >= 1"),
            ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
            ("train.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
            ("train.warmup_steps", t.max_steps is None or t.warmup_steps < t.max_steps,
             f"({t.warmup_steps}) must be shorter than train.max_steps ({t.max_steps})"),
            ("train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("train.max_grad_norm", t.max_grad_norm > 0, "must be > 0"),
            ("train.adam_betas", len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
             "must be two numbers in [0, 1)"),
            ("train.eval_every", t.eval_every >= 1, "must be >= 1"),
            ("train.log_every", t.log_every >= 1, "must be >= 1"),
            ("train.save_every", t.save_every >= 1, "must be >= 1"),
            ("train.keep_checkpoints", t.keep_checkpoints >= 1, "must be >= 1"),
            ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 1, "must be >= 1"),
            ("train.early_stopping_patience",
             t.early_stopping_patience is None or t.early_stopping_patience >= 1, "must be >= 1"),
        ]
    if hasattr(cfg, "lora"):
        lo = cfg.lora
        checks += [
            ("lora.r", lo.r >= 1, "must be >= 1"),
            ("lora.alpha", lo.alpha > 0, "must be > 0"),
            ("lora.dropout", 0 <= lo.dropout < 1, "must be in [0, 1)"),
            ("lora.target", lo.target == "all" or (isinstance(lo.target, list) and len(lo.target) > 0),
             "must be 'all' or a non-empty list of module names"),
        ]
    if hasattr(cfg, "data"):
        d = cfg.data
        checks += [
            ("data.val_fraction", 0 <= d.val_fraction < 1, "must be in [0, 1)"),
            ("data.max_length", d.max_length >= 2, "must be >= 2"),
            ("data.max_samples", d.max_samples is None or d.max_samples >= 1, "must be >= 1"),
        ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {why} (got {_get(cfg, key)!r})")


def _require(cfg: Any, keys: list[str]) -> None:
    for key in keys:
        if _get(cfg, key) in ("", None):
            raise ConfigError(f"missing required config key '{key}'")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Build `cls` from a YAML file (or a dict section of one) plus `key=value` overrides.

    Overrides use dotted keys for nested sections (`train.lr=1e-4`) and YAML syntax for values
    (`lora.target=[q_proj,v_proj]`). The result is validated before it is returned.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set takes key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Recursively build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (a mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = check_type(dotted, value, hint)
    return cls(**kwargs)


def check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return check_type(key, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(hint)} (got {value!r})")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is Any:
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(hint)} (got {value!r})")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
