"""Typed configuration: one dataclass per command, loaded from YAML with `--set key=value` overrides.

Every YAML key maps one-to-one onto a dataclass field. One loader (`load_config`, `build_config`)
checks, in order: unknown keys (the message names the nearest valid key, searching nested
sections too), types (from the field annotations), then `validate()`: every field's declared
range (`bounded(..., gt=0)` in its metadata; every float must also be finite), each section's
`problems()` (relations between its own fields) and the command's `check()` (relations across
sections). Every problem found is reported at once, in one line naming each dotted key. The
resolved config is frozen after loading by convention: stages read it, they never write to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.errors import ConfigError

MAX_SEED = 2**32 - 1
"""numpy's seeds are 32-bit."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field (None: unbounded on that side); a None value is not checked."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def problem(self, value: Any) -> str | None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        for bound, ok, word in ((self.gt, lambda b: value > b, ">"), (self.ge, lambda b: value >= b, ">="),
                                (self.lt, lambda b: value < b, "<"), (self.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                return f"must be {word} {int(bound) if float(bound).is_integer() else f'{bound:g}'}"
        return None


def bounded(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose value must lie in a range, declared where the field is."""
    return field(default=default, metadata={"range": Range(gt, ge, lt, le)})


def seed_field(default: int = 42) -> Any:
    return bounded(default, ge=0, le=MAX_SEED)


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
    r: int = bounded(8, ge=1)
    """Adapter rank."""
    alpha: int = bounded(16, gt=0)
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (peft's `lora_dropout`)."""
    target: str | list[str] = "all"
    """`all` = every linear layer except the output head (peft's `all-linear`), or module names."""
    merge: bool = False
    """Merge the adapter into the base weights in the final model (a plain causal LM), instead of
    saving the adapter alone."""

    def problems(self) -> list[tuple[str, str]]:
        if self.target == "all" or (isinstance(self.target, list) and len(self.target) > 0):
            return []
        return [("target", f"must be 'all' or a non-empty list of module names (got {self.target!r})")]


COLUMN_FIELDS = ("instruction", "input", "output", "prompt", "response", "completion", "chosen", "rejected", "messages")
"""The record fields `data.columns` may fill (align/data.py `FORMAT_FIELDS`, alpaca's `input`)."""
LLAMA_FACTORY_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
"""LLaMA-Factory's alpaca column names, as align's fields (used when its `query` is mapped)."""


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens."""

    train: str = ""
    """A .json/.jsonl/.csv/.parquet file, or a hub dataset name. Required."""
    validation: str | None = None
    """A validation file; when absent, `val_fraction` of train is held out."""
    val_fraction: float = bounded(0.05, ge=0, lt=1)
    """Fraction of train records held out for validation when `validation` is not given (chosen by
    a shuffle seeded with `seed`, at least one record); 0 means no validation."""
    split: str = "train"
    """Split of `train` to read when it is a hub dataset or a dataset directory (TRL's
    `dataset_train_split`)."""
    validation_split: str = "test"
    """Split of `validation` to read when it is a hub dataset or a dataset directory (TRL's
    `dataset_test_split`)."""
    dataset_config: str | None = None
    """The configuration (subset) of a hub dataset or dataset directory: the `name` argument of
    `datasets.load_dataset` (TRL's `dataset_config`, the HF examples' `dataset_config_name`)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Dataset columns renamed onto align's fields, `{field: column}`, e.g. `{prompt: question,
    response: answer}`. Fields: instruction, input, output, prompt, response, completion, chosen,
    rejected, messages. LLaMA-Factory's dataset_info `columns` work as written: with `query`, its
    `prompt`, `query` and `response` are alpaca's instruction, input and output."""
    format: Literal["auto", "alpaca", "prompt_response", "prompt_completion", "chat", "preference", "prompt"] = "auto"
    """Record format; `auto` detects it from the first record's keys."""
    prompt_template: str = "{prompt}"
    """Wraps the prompt; may use `{prompt}`, and for Alpaca records `{instruction}` and `{input}`.
    Not used for chat records (the tokenizer's chat template renders those)."""
    max_length: int = bounded(512, ge=2)
    """Longest tokenized example (prompt + response + EOS)."""
    truncation: Literal["drop", "truncate", "error"] = "drop"
    """Over-long examples: drop them, cut the response to fit, or stop with an error. Counted and
    reported either way."""
    max_samples: int | None = bounded(None, ge=1)
    """Use only the first N records (for smoke runs)."""

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name, column in self.columns.items():
            if name not in COLUMN_FIELDS and name not in LLAMA_FACTORY_COLUMNS:
                out.append((f"columns.{name}", f"is not a field align reads (fields: {', '.join(COLUMN_FIELDS)}; "
                                               "LLaMA-Factory's query)"))
            elif not isinstance(column, str) or not column:
                out.append((f"columns.{name}", f"must name a column (a non-empty string, got {column!r})"))
        if "query" in self.columns and not set(self.columns) <= set(LLAMA_FACTORY_COLUMNS):
            out.append(("columns.query", "is LLaMA-Factory's alpaca input: use it with prompt and response only"))
        return out


SCHEDULER_NAMES = ("warmup_cosine", "linear", "cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                   "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
                   "warmup_stable_decay")
"""`lr_scheduler_type` values: align's `warmup_cosine`, then every `transformers.get_scheduler` type that
follows the step count alone (not `reduce_lr_on_plateau` or `greedy`, which step on a metric). A
test checks the HF names against transformers' `SchedulerType`."""

FLOORED_SCHEDULES = {"warmup_cosine": None, "cosine_with_min_lr": "min_lr_rate",
                     "cosine_warmup_with_min_lr": "min_lr_rate", "warmup_stable_decay": "min_lr_ratio"}
"""Schedules that end at a floor, and the `lr_scheduler_kwargs` key that `min_lr_ratio` becomes."""

TRACKER_NAMES = ("tensorboard", "wandb", "trackio", "mlflow")
"""`report_to` values: accelerate's trackers of those names."""


@dataclass
class OptimizerConfig:
    """AdamW, its learning-rate schedule and precision, and where metrics are reported: the same
    keys in every training section (`train`, `ppo`)."""

    lr: float = bounded(2e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay, on parameters with 2+ dimensions (weight matrices, embeddings) only;
    biases and norm weights are never decayed."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's [beta1, beta2]."""
    max_grad_norm: float = bounded(1.0, gt=0)
    """Clip the global gradient norm to this before every optimizer step (per model)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute dtype through accelerate. `auto`: bf16 on a GPU that supports it, else none."""
    lr_scheduler_type: Literal["warmup_cosine", "linear", "cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                               "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                               "inverse_sqrt", "warmup_stable_decay"] = "warmup_cosine"
    """The learning-rate schedule, stepped once per optimizer step (RL: once per rollout step).
    `warmup_cosine` (align's): linear warmup whose first step is already at lr / warmup, then cosine
    decay to `min_lr_ratio` x lr; every other name is `transformers.get_scheduler`'s, with HF's
    meaning (its warmups start at lr 0). docs/sft.md has the formulas."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of a get_scheduler type (HF's `lr_scheduler_kwargs`: `num_cycles`, `power`,
    `lr_end`, `num_decay_steps`, ...)."""
    warmup_steps: int = bounded(0, ge=0)
    """Optimizer steps of linear warmup at the start of the schedule."""
    warmup_ratio: float | None = bounded(None, ge=0, lt=1)
    """Warmup as a fraction of the run's steps (rounded up, as HF Trainer does); instead of
    `warmup_steps`, which must then stay 0."""
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    """The learning rate the decay ends at, as a fraction of `lr` (`warmup_cosine`,
    `cosine_with_min_lr` and `cosine_warmup_with_min_lr`: HF's `min_lr_rate`; `warmup_stable_decay`:
    its `min_lr_ratio`)."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = field(
        default_factory=lambda: ["tensorboard"])
    """Trackers that receive every row of metrics.jsonl (accelerate's, by name; [] for none).
    tensorboard writes `<output_dir>/tensorboard/align/`; wandb, trackio and mlflow need
    `pip install "align[trackers]"` and follow their own environment (WANDB_MODE, TRACKIO_DIR,
    MLFLOW_TRACKING_URI, ...). metrics.jsonl is always written and is the record of the run."""

    def warmup_for(self, n_steps: int) -> int:
        """Warmup steps of a run of `n_steps`: `warmup_steps`, or `warmup_ratio` x n_steps rounded up."""
        return math.ceil(self.warmup_ratio * n_steps) if self.warmup_ratio is not None else self.warmup_steps

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            out.append(("adam_betas", "must be two numbers in [0, 1)"))
        if self.warmup_ratio is not None and self.warmup_steps:
            out.append(("warmup_ratio", "and warmup_steps exclude each other; set one"))
        kind = self.lr_scheduler_type
        if self.min_lr_ratio and kind not in FLOORED_SCHEDULES:
            out.append(("min_lr_ratio", f"applies to the schedules that end at a floor ({', '.join(FLOORED_SCHEDULES)}), "
                                        f"not '{kind}'"))
        if kind == "warmup_cosine" and self.lr_scheduler_kwargs:
            out.append(("lr_scheduler_kwargs", "must stay empty for 'warmup_cosine' (its settings are warmup_steps "
                                               "or warmup_ratio, and min_lr_ratio)"))
        if self.min_lr_ratio and {"min_lr", "min_lr_rate", "min_lr_ratio"} & set(self.lr_scheduler_kwargs):
            out.append(("min_lr_ratio", "and the floor in lr_scheduler_kwargs exclude each other; set one"))
        if kind == "constant" and (self.warmup_steps or self.warmup_ratio):
            out.append(("lr_scheduler_type", "'constant' has no warmup; use 'constant_with_warmup'"))
        if len(set(self.report_to)) != len(self.report_to):
            out.append(("report_to", f"names a tracker twice (got {self.report_to})"))
        return out


@dataclass
class TrainConfig(OptimizerConfig):
    """The optimisation loop of the supervised stages (SFT, the reward model) and of DPO."""

    epochs: float = bounded(1.0, gt=0)
    """Passes over the training set; fractions allowed. Steps = epochs x (examples // global
    batch): each epoch's last partial global batch is skipped."""
    max_steps: int | None = bounded(None, gt=0)
    """Optimizer steps; overrides `epochs` when set."""
    batch_size: int = bounded(8, ge=1)
    """Examples per micro-batch per process."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches per optimizer step. Global batch = batch_size x grad_accum x processes."""
    eval_every: int = bounded(50, ge=1)
    """Evaluate on the validation set every N optimizer steps, and after the last one."""
    log_every: int = bounded(10, ge=1)
    """Append training metrics (averaged since the last log) to metrics.jsonl every N optimizer
    steps, and after the last one."""
    save_every: int = bounded(200, ge=1)
    """Write a resumable checkpoint every N optimizer steps (none after the last step: the final
    model is written then)."""
    keep_checkpoints: int = bounded(2, ge=1)
    """How many of the newest checkpoints to keep; older ones are deleted."""
    early_stopping_patience: int | None = bounded(None, ge=1)
    """Stop after this many evaluations without a new best validation loss."""
    max_nonfinite_steps: int = bounded(3, ge=1)
    """A step with a non-finite loss or gradient is skipped; this many in a row stop the run."""
    max_eval_batches: int | None = bounded(None, ge=1)
    """Cap on validation batches per evaluation (None: the whole validation set)."""
    padding_free: bool | None = None
    """SFT only: pack each micro-batch's examples into rows (position ids restarting per example, no
    padding between them) instead of padding every example to the longest. Same loss, fewer tokens
    computed when lengths vary. It needs a model whose attention keeps packed examples apart
    (transformers' `create_causal_mask`: Llama, Mistral, Qwen2, Gemma, GPT-2 and most others; not
    OPT or Bloom), which is checked on the loaded model. None: pack when that check passes, else pad;
    true: pack, and stop if the check fails; false: pad."""

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            out.append(("warmup_steps", f"({self.warmup_steps}) must be shorter than train.max_steps ({self.max_steps})"))
        return out


# ----------------------------------------------------------------------------------------------
# One config per command


class Command:
    """What every command config shares: `validate()`, run by the loader (`build_config`)."""

    def validate(self) -> None:
        """Every declared range, every section's `problems()`, then `check()`; all problems found
        are reported together in one ConfigError."""
        found = _field_problems(self, "")
        if not found:
            found = self.check()
        if found:
            raise ConfigError("; ".join(found))

    def check(self) -> list[str]:
        """Relations across sections: one message per problem (`bad(key, why)`, `_require`)."""
        return []


def bad(key: str, why: str) -> str:
    return f"config key '{key}' {why}"


def _field_problems(obj: Any, prefix: str) -> list[str]:
    """Declared ranges and finiteness of every field, and each section's own `problems()`
    ((relative key, why) pairs)."""
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _field_problems(value, f"{key}.")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            out.append(bad(key, f"must be a finite number (got {value!r})"))
            continue
        why = f.metadata.get("range", Range()).problem(value)
        if why:
            out.append(bad(key, f"{why} (got {value!r})"))
    if hasattr(obj, "problems"):
        out += [bad(f"{prefix}{k}", why) for k, why in obj.problems()]
    return out


def _require(cfg: Any, keys: list[str]) -> list[str]:
    return [f"missing required config key '{key}'" for key in keys if _get(cfg, key) in ("", None)]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass
class SFTConfig(Command):
    """`align sft`: supervised fine-tuning with masked NLL on response tokens."""

    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/, summary.json. Required."""
    seed: int = seed_field()
    """Seeds python, numpy and torch, the validation hold-out and each epoch's example order."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))

    def check(self) -> list[str]:
        return _require(self, ["output_dir", "model.path", "data.train"])


@dataclass
class RMConfig(Command):
    """`align rm`: a reward model from preference pairs, trained with the Bradley-Terry loss."""

    output_dir: str = ""
    """Run directory; the reward model is written to `<output_dir>/model`. Required."""
    seed: int = seed_field()
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
    of its responses is subtracted from the score head's bias where the head has one, else stored
    in `model/align_reward.json` and subtracted at scoring time, so such responses score 0 on
    average. None: no normalisation."""

    def check(self) -> list[str]:
        out = _require(self, ["output_dir", "model.path", "data.train"])
        if self.train.padding_free:
            out.append("config key 'train.padding_free' applies to SFT only; the reward model pads its pairs")
        return out


@dataclass
class CriticConfig:
    """The trained value model of PPO (`ppo.estimator: gae`): a scalar head read at every response
    token. The critic-free methods load none."""

    path: str | None = None
    """Backbone to start from: the reward model (the default when `reward.model` is set, as in
    Ouyang et al. 2022) or the SFT model (`model.path`, the default otherwise)."""
    lr: float = bounded(1e-5, gt=0)
    """Critic learning rate (its own AdamW and schedule)."""
    lora: bool = False
    """Train the critic through a LoRA adapter (same settings as the actor's `lora` section)."""
    share_actor: bool = False
    """A value head on the actor's own trunk instead of a separate critic model (the trlX /
    LLaMA-Factory design): one forward gives the log-probs and the values, and no second backbone
    is held or trained. The value loss (x `ppo.vf_coef`) then also trains the actor's trunk; the
    head has its own AdamW at `critic.lr`. `critic.path` and `critic.lora` do not apply."""
    warmup_steps: int = bounded(0, ge=0)
    """Train only the critic for the first N steps (the actor is not updated), so the policy is
    not steered by an untrained value function's advantages (as in OpenRLHF's
    `freezing_actor_steps`)."""


@dataclass
class RewardConfig:
    """The frozen reward: a reward model run, or a Python function; and how raw scores become
    training scores (align/reward.py: missing-EOS penalty, overlong penalty, then clip)."""

    model: str | None = None
    """Reward model path (an `align rm` run directory works). One of `model` or `function`."""
    function: str | None = None
    """`module:function` taking (prompts: list[str], responses: list[str]) and returning floats."""
    device: Literal["auto", "cpu"] = "auto"
    """Where the reward model lives: with the policy (`auto`) or always on CPU."""
    offload: bool = False
    """Keep the reward model on CPU and move it to the accelerator only while scoring."""
    normalize: bool = True
    """Apply the normalisation `align rm --set normalize_with=...` stored, if any (subtract the
    `bias` of align_reward.json); false: the raw score (what a score head's bias holds of it added back)."""
    clip: float | None = bounded(None, gt=0)
    """Clip training scores to [-clip, clip] (after the penalties)."""
    whiten: bool = False
    """Whiten the per-token rewards over the batch before GAE (scale only, mean kept; gae only)."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that ran out of room before EOS (the EOS trick,
    Huang et al. 2024); None disables it."""
    overlong_buffer: int | None = bounded(None, ge=1)
    """Soft overlong penalty (DAPO, Yu et al. 2025): over the last N tokens of
    `ppo.response_length`, a penalty growing linearly from 0 to `overlong_penalty`. None: off."""
    overlong_penalty: float = bounded(1.0, ge=0)
    """The largest overlong penalty (at `ppo.response_length` tokens)."""


ESTIMATOR_NAMES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax")
"""The advantage estimators of align/rl.py's registry, for the config's type (tests check the two agree)."""


@dataclass
class PPOLoopConfig(OptimizerConfig):
    """The loop every online method runs (align/ppo.py): sample a group of responses per prompt,
    score them, compute advantages with the chosen estimator, then PPO's clipped-ratio updates.
    Names follow the PPO paper and TRL; the methods differ in `estimator` and where the KL goes."""

    lr_scheduler_type: Literal["warmup_cosine", "linear", "cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                               "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                               "inverse_sqrt", "warmup_stable_decay"] = "linear"
    """The learning-rate schedule of the actor and the critic, stepped once per rollout step (each
    step's PPO epochs and minibatches share one lr). `linear` (the default): from lr down to 0 over
    the run, as CleanRL and TRL anneal PPO's; see `train.lr_scheduler_type` for the others."""
    estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax"] = "gae"
    """Advantage estimator (align/rl.py): `gae` (PPO, with a critic), `grpo`, `dr_grpo`, `rloo`,
    `reinforce_pp`, `remax` (critic-free)."""
    n_samples_per_prompt: int = bounded(1, ge=1)
    """Responses sampled per prompt (a group); the group estimators need at least 2."""
    total_episodes: int = bounded(1024, ge=1)
    """Responses to sample over the whole run; steps = total_episodes / (rollout_batch_size x processes)."""
    rollout_batch_size: int = bounded(64, ge=1)
    """Responses sampled per step, per process: rollout_batch_size / n_samples_per_prompt prompts."""
    mini_batch_size: int = bounded(16, ge=1)
    """Responses per PPO update (one optimizer step), per process."""
    micro_batch_size: int = bounded(16, ge=1)
    """Responses per forward/backward; mini_batch_size / micro_batch_size is the gradient accumulation."""
    fuse_scoring: bool = True
    """When one forward covers the rollout (mini_batch_size and micro_batch_size >= rollout_batch_size),
    take the old log-probs and values from the first update's forward rather than a separate pass:
    the weights have not changed yet, so the numbers are the same, and a step does two fewer forwards."""
    ppo_epochs: int = bounded(4, ge=1)
    """Passes over each rollout batch, reshuffled each time."""
    response_length: int = bounded(32, ge=1)
    """Most new tokens per response."""
    temperature: float = bounded(0.7, gt=0)
    """Sampling temperature; the same scaling is applied to the logits when scoring."""
    kl_placement: Literal["reward", "loss"] | None = None
    """Where the KL to the reference goes: `reward` (-kl_coef x kl_t in the per-token reward, as in
    PPO, RLOO, REINFORCE++, ReMax) or `loss` (kl_coef x kl_t added to the per-token loss, as in
    GRPO). None: the estimator's default."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """Per-token estimator of KL(actor || reference) (Schulman, Approximating KL divergence). None:
    k1 in the reward, k3 (GRPO's "low-variance" estimator) in the loss."""
    kl_coef: float = bounded(0.05, ge=0)
    """beta: weight of the KL penalty (initial value when adaptive)."""
    kl_target: float | None = bounded(None, gt=0)
    """Adaptive KL (Ziegler et al. 2019): steer beta so the sequence KL approaches this. None: fixed beta."""
    kl_horizon: int = bounded(10000, ge=1)
    """Adaptive KL horizon, in episodes."""
    gamma: float = bounded(1.0, ge=0, le=1)
    """Discount factor over response tokens (gae, reinforce_pp; 1: no discounting)."""
    lam: float = bounded(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """Whiten advantages over the batch's response tokens. None: on for gae (PPO), off for the
    others, whose estimators normalise their own way (reinforce_pp whitens as part of its definition)."""
    clip_eps: float = bounded(0.2, gt=0)
    """Policy ratio clip range; the lower one, 1 - clip_eps, when `clip_eps_high` is set."""
    clip_eps_high: float | None = bounded(None, gt=0)
    """Clip-higher (DAPO, Yu et al. 2025): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].
    None: symmetric."""
    clip_c: float | None = bounded(None, gt=1)
    """Dual clip (Ye et al. 2020): for negative advantages the per-token loss is capped at
    -clip_c x A. None: off."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"
    """How the (B, T) policy loss is reduced (verl's names): `token-mean` over every response token of
    the minibatch; `seq-mean-token-mean` per response then over responses (GRPO's paper);
    `seq-mean-token-sum` sum per response, mean over responses; `seq-mean-token-sum-norm` sum over the
    minibatch / (responses x response_length) (Dr. GRPO). The same update whatever the micro-batch
    split and process count."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards all equal each other (zero advantage, no
    signal) and sample more prompts until the batch is full (group estimators only)."""
    max_sampling_rounds: int = bounded(3, ge=1)
    """With dynamic sampling: the most generate calls per step; a batch still short after them is
    topped up with dropped groups (logged as `rollout/topped_up_groups`)."""
    value_clip_eps: float | None = bounded(0.2, gt=0)
    """Value clip range around the rollout's values; None disables value clipping."""
    vf_coef: float = bounded(0.1, ge=0)
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    log_every: int = bounded(1, ge=1)
    """Append metrics to metrics.jsonl every N steps, and after the last one."""
    sample_every: int = bounded(10, ge=1)
    """Every N steps, log a few prompt/response/score rows (to the console and samples.jsonl)."""
    samples_logged: int = bounded(4, ge=0)
    """How many prompt/response/score rows each `sample_every` log holds."""
    eval_every: int = bounded(20, ge=1)
    """Every N steps (and at step 0 and the end), greedy responses on the eval prompts, scored."""
    save_every: int = bounded(50, ge=1)
    """Write a resumable checkpoint every N steps (none after the last step: the final model
    is written then)."""
    keep_checkpoints: int = bounded(2, ge=1)
    """How many of the newest checkpoints to keep; older ones are deleted."""
    max_nonfinite_steps: int = bounded(3, ge=1)
    """An update with a non-finite loss or gradient is skipped; this many steps in a row stop the run."""
    warn_kl: float = 20.0
    """Warn (and flag `guard/kl_high` in the metrics) when objective/kl exceeds this."""
    warn_clipfrac: float = 0.4
    """Warn (`guard/clipfrac_high`) when policy/clipfrac_avg exceeds this: updates too large."""
    warn_value_loss: float = 100.0
    """Warn (`guard/value_loss_high`) when loss/value_avg exceeds this: the critic is lost."""
    warn_length_ratio: float = bounded(3.0, gt=1)
    """Warn (`guard/length_drift`) when the mean response length falls below 1/ratio or rises
    above ratio times the first step's: a common sign of reward hacking."""

    @property
    def kl_in_loss(self) -> bool:
        """Whether the KL goes into the loss (else into the reward), the estimator's default applied."""
        from align.rl import get_estimator

        return (self.kl_placement or get_estimator(self.estimator).default_kl) == "loss"

    @property
    def kl_kind(self) -> str:
        """The KL estimator in use: `kl_estimator`, else k3 in the loss and k1 in the reward."""
        return self.kl_estimator or ("k3" if self.kl_in_loss else "k1")

    @property
    def whiten(self) -> bool:
        return self.whiten_advantages if self.whiten_advantages is not None else self.estimator == "gae"

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        n = self.n_samples_per_prompt
        if self.rollout_batch_size % n:
            out.append(("rollout_batch_size", f"must be a multiple of ppo.n_samples_per_prompt ({n}) "
                                              f"(got {self.rollout_batch_size})"))
        if self.mini_batch_size > self.rollout_batch_size or self.rollout_batch_size % self.mini_batch_size:
            out.append(("mini_batch_size", f"must divide ppo.rollout_batch_size (got {self.mini_batch_size})"))
        if self.micro_batch_size > self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            out.append(("micro_batch_size", f"must divide ppo.mini_batch_size (got {self.micro_batch_size})"))
        if self.total_episodes < self.rollout_batch_size:
            out.append(("total_episodes", f"must be at least one rollout batch ({self.rollout_batch_size}) "
                                          f"(got {self.total_episodes})"))
        # accelerate keeps one GradScaler for all prepared optimizers: with actor and critic each
        # clipped and stepped, fp16 would unscale twice and fail. bf16 needs no scaler.
        if self.mixed_precision == "fp16":
            out.append(("mixed_precision", "fp16 is not supported by the RL loop's optimizers; use bf16 "
                                           "(got 'fp16')"))
        return out


ENGINE_NAMES = ("hf", "vllm")
"""The rollout engines of align/rollout.py's registry, for the config's type (tests check the two agree)."""


@dataclass
class RolloutConfig:
    """The engine that samples the RL loop's responses (align/rollout.py): transformers' `generate`
    on the actor itself (`hf`), or vLLM colocated in the training process (`vllm`), fed the actor's
    weights after every update. The trainer's own log-probs stay the old log-probs either way."""

    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: `generate` on the actor (no extra install). `vllm`: a vLLM engine in the same process,
    started once per run (`pip install -e .[vllm]`, or the CPU build of docs/scaling.md)."""
    correction: Literal["tis", "mis"] | None = None
    """Importance correction for the sampler/trainer gap (Yao et al. 2025), read from the sampler's
    own log-probs (`vllm` only): each token's policy loss is weighted by w = pi_trainer / pi_sampler
    of the sampled token under the rollout's weights, `tis` truncated at `correction_cap`, `mis`
    set to 0 above it. None: no weight (the gap is still logged as `rollout/logprob_diff_*`)."""
    correction_cap: float = bounded(2.0, gt=0)
    """The cap C of `correction` (2 in Yao et al. 2025 and verl)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The engine's weight dtype. `auto`: bfloat16 on a GPU that supports it, else float32."""
    gpu_memory_utilization: float = bounded(0.3, gt=0, le=1)
    """On a GPU: the share of its memory vLLM may take (weights and KV cache), the rest is the
    trainer's. Not used on CPU, where `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the KV cache."""
    enforce_eager: bool = True
    """Run vLLM's model eagerly: no torch.compile warm-up, so the engine starts in seconds. false lets
    vLLM compile it (tens of seconds at start; docs/performance.md measures what it buys)."""
    sleep: bool = False
    """On a GPU: put the engine to sleep (vLLM's sleep mode, level 1: KV cache dropped, weights
    offloaded to CPU) while the trainer updates, and wake it for the next weight sync. Ignored on
    CPU, where vLLM has no sleep mode."""


@dataclass
class PPOEvalConfig:
    """The held-out evaluation run during training: greedy responses on fixed prompts, scored by
    the learned reward and the gold one, at step 0 and every `ppo.eval_every` steps, logged with
    the episodes, tokens and time spent so far (curves at matched compute)."""

    prompts: str | None = None
    """Eval prompt file; None disables the evaluation hook."""
    gold_reward: str | None = None
    """`module:function` gold reward, reported beside the learned one and never used in training."""
    max_samples: int | None = bounded(200, ge=1)
    """Use only the first N eval prompts (None: all of them)."""


@dataclass
class RLConfig(Command):
    """An online RL method in align's one loop (align/ppo.py): the policy starts from the SFT model,
    the reference is the SFT model frozen, the reward a model or function; PPO adds a critic.
    `align ppo`, `align grpo`, `align dr_grpo`, `align rloo`, `align reinforce_pp` and `align remax`
    take this config, each with its own defaults (the stage configs below)."""

    output_dir: str = ""
    """Run directory; the policy is written to `<output_dir>/model`. Required."""
    seed: int = seed_field()
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
    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(lr=3e-6))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)

    def check(self) -> list[str]:
        from align.rl import get_estimator

        out = _require(self, ["output_dir", "model.path", "data.train"])
        if (self.reward.model is None) == (self.reward.function is None):
            out.append("set exactly one of config keys 'reward.model' and 'reward.function'")
        p, est = self.ppo, get_estimator(self.ppo.estimator)
        if est.group and p.n_samples_per_prompt < 2:
            out.append(bad("ppo.n_samples_per_prompt", f"must be >= 2 for estimator '{p.estimator}' (its baseline is "
                                                       f"the other responses to the prompt) (got {p.n_samples_per_prompt})"))
        if p.dynamic_sampling and not est.group:
            out.append(bad("ppo.dynamic_sampling", f"needs a group estimator (grpo, dr_grpo, rloo), not '{p.estimator}'"))
        if not est.needs_critic and self.critic.share_actor:
            out.append(bad("critic.share_actor", f"needs a critic, and estimator '{p.estimator}' has none "
                                                 "(only gae trains one)"))
        elif not est.needs_critic and (self.critic.path or self.critic.lora or self.critic.warmup_steps):
            out.append(f"config section 'critic' applies to estimator gae only (the one with a critic), "
                       f"not '{p.estimator}'")
        if self.critic.share_actor and (self.critic.path or self.critic.lora):
            out.append(bad("critic.share_actor", "puts the value head on the actor: leave critic.path and "
                                                 "critic.lora unset"))
        if self.critic.warmup_steps >= p.total_episodes // p.rollout_batch_size:
            out.append(bad("critic.warmup_steps", f"({self.critic.warmup_steps}) must be shorter than the run"))
        if self.rollout.correction and self.rollout.engine == "hf":
            out.append(bad("rollout.correction", "needs the sampler's own log-probs, and engine 'hf' samples with "
                                                 "the trainer itself (no gap to correct); set rollout.engine: vllm"))
        return out


@dataclass
class PPOConfig(RLConfig):
    """`align ppo`: RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019): GAE advantages from a
    trained critic, the KL to the reference in the per-token reward."""


@dataclass
class GRPOStageConfig(RLConfig):
    """`align grpo`: GRPO (Shao et al. 2024): a group of responses per prompt, advantage (r - group
    mean) / group std on every token, no critic, the KL (k3) in the loss."""

    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(
        estimator="grpo", n_samples_per_prompt=8, lr=1e-6, ppo_epochs=1, mini_batch_size=64, micro_batch_size=16))


@dataclass
class DrGRPOStageConfig(RLConfig):
    """`align dr_grpo`: Dr. GRPO (Liu et al. 2025): GRPO without the std division and without the
    per-response length normalisation (loss summed over tokens / a constant)."""

    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(
        estimator="dr_grpo", n_samples_per_prompt=8, lr=1e-6, ppo_epochs=1, mini_batch_size=64, micro_batch_size=16,
        loss_agg="seq-mean-token-sum-norm"))


@dataclass
class RLOOStageConfig(RLConfig):
    """`align rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024): the baseline of each response
    is the mean reward of the other responses to its prompt; the KL (summed over the response)
    enters the reward."""

    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(
        estimator="rloo", n_samples_per_prompt=8, lr=1e-6, ppo_epochs=1, mini_batch_size=64, micro_batch_size=16))


@dataclass
class ReinforcePPStageConfig(RLConfig):
    """`align reinforce_pp`: REINFORCE++ (Hu 2025): per-token rewards (score at the end, -beta x
    kl_t per token), returns whitened over the whole batch; no critic, no group."""

    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(
        estimator="reinforce_pp", lr=1e-6, ppo_epochs=1, mini_batch_size=64, micro_batch_size=16))


@dataclass
class ReMaxStageConfig(RLConfig):
    """`align remax`: ReMax (Li et al. 2023): the baseline of a sampled response is the reward of
    the greedy response to the same prompt; no critic."""

    ppo: PPOLoopConfig = field(default_factory=lambda: PPOLoopConfig(
        estimator="remax", lr=1e-6, ppo_epochs=1, mini_batch_size=64, micro_batch_size=16))


@dataclass
class EvalConfig(Command):
    """`align eval`: the same held-out prompts through several checkpoints, one set of metrics."""

    output_dir: str = ""
    """Where `results.json` and each model's `responses/<name>.jsonl` are written. Required."""
    seed: int = seed_field()
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
    max_prompt_length: int = bounded(256, ge=1)
    """Prompts longer than this many tokens are left out."""
    max_samples: int | None = bounded(None, ge=1)
    """Use only the first N prompts."""
    response_length: int = bounded(32, ge=1)
    """Most new tokens per response."""
    reward_model: str | None = None
    """The learned reward (an `align rm` run)."""
    reward_function: str | None = None
    """Or a `module:function` reward."""
    gold_reward: str | None = None
    """`module:function` gold reward, when the task has one."""
    validation: str | None = None
    """SFT validation file (prompt/response records) for perplexity and token accuracy."""
    kl_temperature: float = bounded(1.0, gt=0)
    """Temperature of the samples the KL to the reference is estimated on (1: the policy itself)."""
    sampled: bool = False
    """Also score one temperature-`kl_temperature` sample per prompt (besides the greedy response)."""
    batch_size: int = bounded(64, ge=1)
    """Prompts generated for (and validation examples scored) per batch."""
    max_length: int = bounded(512, ge=2)
    """Longest validation example (tokens)."""
    best_of: int | None = bounded(None, ge=1)
    """Also evaluate best-of-n with this n: for each model named in `best_of_models`, sample n
    responses per prompt at `best_of_temperature`, keep the one the learned reward prefers, and
    report it as a row `<name> (best-of-<n>)` with its sampling cost. Needs a learned reward."""
    best_of_models: list[str] | None = None
    """Names (see `names`) of the models to evaluate with best-of-n; default: the first model."""
    best_of_temperature: float = bounded(1.0, gt=0)
    """Sampling temperature of the best-of-n candidates."""
    best_of_curve: list[int] | None = None
    """Also best-of-n as a curve over these n, e.g. [1, 2, 4, 8, 16], for each model of
    `best_of_models`: one draw of max(n) samples per prompt, and every n's point estimated from it
    (align/stats.py `best_of_n_estimate`), each with its gold and learned reward, KL bound and
    sampling cost. Written to results.json's `best_of_curves`. Needs a learned reward."""
    best_of_engine: Literal["hf", "vllm"] = "hf"
    """The rollout engine that samples the best-of-n candidates (align/rollout.py): `hf`, transformers'
    `generate`; `vllm`, a vLLM engine in this process, started once per best-of-n model (greedy and
    `sampled` responses stay HF's). Needs vLLM (docs/scaling.md)."""

    def check(self) -> list[str]:
        out = _require(self, ["output_dir", "prompts"])
        if not self.models:
            out.append("missing required config key 'models' (the checkpoints to evaluate)")
        if self.names is not None and len(self.names) != len(self.models):
            out.append(f"config key 'names' has {len(self.names)} names for {len(self.models)} models")
        if self.reward_model and self.reward_function:
            out.append("set at most one of config keys 'reward_model' and 'reward_function'")
        if self.best_of is not None and not (self.reward_model or self.reward_function):
            out.append("config key 'best_of' needs a reward to choose with: set 'reward_model' or 'reward_function'")
        if self.best_of_curve is not None:
            if not (self.reward_model or self.reward_function):
                out.append("config key 'best_of_curve' needs a reward to choose with: set 'reward_model' or "
                           "'reward_function'")
            if not self.best_of_curve:
                out.append("config key 'best_of_curve' is empty; list the n to estimate, e.g. [1, 2, 4, 8, 16]")
            bad = [n for n in self.best_of_curve if n < 1]  # from_dict has checked they are ints
            if bad:
                out.append(f"config key 'best_of_curve' holds {bad[0]!r}; every n must be an integer >= 1")
            elif len(set(self.best_of_curve)) != len(self.best_of_curve):
                out.append("config key 'best_of_curve' lists an n twice")
        names = self.names or [Path(m).parent.name if Path(m).name == "model" else Path(m).name for m in self.models]
        for name in self.best_of_models or []:
            if name not in names:
                out.append(f"config key 'best_of_models' names '{name}', which is not one of the models "
                           f"({', '.join(names)})")
        return out


@dataclass
class SampleConfig(Command):
    """`align sample`: rejection-sampled data. For each prompt, sample `best_of` responses and keep
    the one the reward prefers; write `{prompt, response, score}` JSONL, usable as SFT data."""

    model: str = ""
    """The checkpoint (or run directory) to sample from. Required."""
    prompts: str = ""
    """Prompt file (any prompt format). Required."""
    out: str = ""
    """The JSONL file to write; must not exist yet. Required."""
    best_of: int = bounded(4, ge=1)
    """K: responses sampled per prompt."""
    reward_model: str | None = None
    """The reward that chooses (an `align rm` run). One of `reward_model` and `reward_function`."""
    reward_function: str | None = None
    """Or a `module:function` reward taking (prompts, responses) and returning floats."""
    normalize: bool = True
    """Apply the normalisation stored with the reward model (`align rm --set normalize_with=...`), if
    any; false: the raw score."""
    prompt_template: str | None = None
    """Prompt template; None: the one in the model's run config, else `{prompt}`."""
    max_prompt_length: int = bounded(256, ge=1)
    """Prompts longer than this many tokens are left out."""
    max_samples: int | None = bounded(None, ge=1)
    """Use only the first N prompts."""
    response_length: int = bounded(32, ge=1)
    """Most new tokens per response."""
    temperature: float = bounded(1.0, gt=0)
    """Sampling temperature."""
    batch_size: int = bounded(16, ge=1)
    """Prompts per generate call (each call samples batch_size x best_of responses)."""
    engine: Literal["hf", "vllm"] = "hf"
    """The rollout engine that samples (align/rollout.py): `hf`, transformers' `generate`; `vllm`, a
    vLLM engine in this process (docs/scaling.md has the install line)."""
    seed: int = seed_field()
    """Seeds the sampling."""

    def check(self) -> list[str]:
        out = _require(self, ["model", "prompts", "out"])
        if (self.reward_model is None) == (self.reward_function is None):
            out.append("set exactly one of config keys 'reward_model' and 'reward_function'")
        return out


@dataclass
class CurateConfig(Command):
    """`align curate`: SFT data filtered by a score threshold, deduplicated, at most so many responses
    per prompt, then chosen down to a target size (align/curate.py says how, step by step)."""

    data: str = ""
    """The SFT data to curate (a .jsonl/.json/.csv/.parquet file of any SFT format). Required."""
    out: str = ""
    """The JSONL file to write the kept records to; must not exist yet. Required."""
    report: str | None = None
    """Where the report (JSON: counts per reason dropped, examples) goes; default `<out>.report.json`."""
    format: Literal["auto", "alpaca", "prompt_response", "prompt_completion", "chat"] = "auto"
    """Record format; `auto` detects it from the first record's keys."""
    score_field: str | None = None
    """Score each record by this numeric field of it (e.g. `score`, as `align sample` writes)."""
    reward_model: str | None = None
    """Or score each record with this reward model (an `align rm` run); the score is written as `score`."""
    normalize: bool = True
    """With `reward_model`: subtract the bias stored with it (`align rm --set normalize_with=...`)."""
    prompt_template: str | None = None
    """With `reward_model`: the template its prompts were trained with; None: the one in its run config."""
    batch_size: int = bounded(64, ge=1)
    """Records scored per reward-model forward pass."""
    min_score: float | None = None
    """Drop records scoring below this (inclusive: a score equal to it is kept). Needs a score."""
    dedup: bool = True
    """Drop exact duplicates (prompt and response equal after NFKC, case folding, whitespace collapsing)."""
    max_per_prompt: int | None = bounded(None, ge=1)
    """Keep at most this many responses per prompt (the highest-scoring)."""
    target: int | None = bounded(None, ge=1)
    """Keep exactly this many records, chosen to cover as many prompts as possible; fewer left is an error."""

    def check(self) -> list[str]:
        out = _require(self, ["data", "out"])
        if self.score_field and self.reward_model:
            out.append("set at most one of config keys 'score_field' and 'reward_model'")
        if self.min_score is not None and not (self.score_field or self.reward_model):
            out.append("config key 'min_score' needs a score: set 'score_field' or 'reward_model'")
        return out


@dataclass
class SFTVariantsConfig(Command):
    """The `sft_variants` stage of a recipe: several SFT runs, each the recipe's `sft` section with
    some keys changed (other data, LoRA, ...), compared side by side. Built by the pipeline
    (align/pipeline.py), not loaded from a file: the recipe's section maps each variant's name to
    the keys it changes."""

    output_dir: str = ""
    """The stage's directory: a run directory per variant, `<output_dir>/<name>/`, and summary.json."""
    variants: dict[str, Any] = field(default_factory=dict)
    """Name -> its SFTConfig, complete and validated."""

    def check(self) -> list[str]:
        out = _require(self, ["output_dir"])
        if not self.variants:
            out.append("the sft_variants section names no variant")
        return out


@dataclass
class DPOStageConfig(Command):
    """`align dpo`: Direct Preference Optimization (Rafailov et al. 2023) through TRL's DPOTrainer, from
    the SFT model on the reward model's preference pairs; the reference is the SFT model, frozen."""

    output_dir: str = ""
    """Run directory; the policy is written to `<output_dir>/model`. Required."""
    seed: int = seed_field()
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
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, lr_scheduler_type="cosine_with_min_lr"))
    """Optimisation, mapped onto TRL's arguments; `batch_size` counts pairs. The schedule defaults to
    HF's `cosine_with_min_lr` (warmup from lr 0), what this stage has always run. `max_nonfinite_steps`
    is not used (TRL has no such guard); `early_stopping_patience` and `max_eval_batches` must stay
    unset; `save_every`/`keep_checkpoints` are TRL's `save_steps`/`save_total_limit`."""
    beta: float = bounded(0.1, gt=0)
    """beta of the DPO loss: how strongly the policy is held to the reference (the implicit reward is
    beta x log pi/pi_ref)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """TRL's `loss_type`: `sigmoid` is DPO's -log sigmoid(beta x margin)."""
    reference: str | None = None
    """Reference policy; None: `model.path` (the SFT model)."""

    def check(self) -> list[str]:
        out = _require(self, ["output_dir", "model.path", "data.train"])
        # TrainConfig keys that TRL's DPOTrainer has no counterpart for must stay unset.
        for key in ("early_stopping_patience", "max_eval_batches", "padding_free"):
            if getattr(self.train, key):
                out.append(f"config key 'train.{key}' is not supported by the TRL stages")
        if self.train.lr_scheduler_type == "warmup_cosine":
            out.append("config key 'train.lr_scheduler_type' 'warmup_cosine' is align's own schedule, which TRL's "
                       "trainer does not run; use one of transformers' (this stage's default: cosine_with_min_lr)")
        return out


@dataclass
class InitModelConfig(Command):
    """`align init-model` (and a recipe's `init_model` section): a tiny Llama-style model and a
    byte-level tokenizer, built offline, for the default recipe and the tests."""

    hidden: int = bounded(64, ge=1)
    """Hidden size; a multiple of `heads`."""
    layers: int = bounded(2, ge=1)
    """Transformer layers."""
    heads: int = bounded(4, ge=1)
    """Attention heads."""
    max_position: int = bounded(256, ge=2)
    """Longest sequence the model can see."""
    vocab_size: int = bounded(260, ge=260)
    """Tokenizer entries; 260 = the 256 bytes + 4 specials, no merges (more needs a corpus)."""
    seed: int = seed_field(0)
    """Seeds the weights (in a recipe: the recipe's `seed`, unless the section sets its own)."""

    def check(self) -> list[str]:
        if self.hidden % self.heads:
            return [bad("hidden", f"({self.hidden}) must be a multiple of heads ({self.heads})")]
        if (self.hidden // self.heads) % 2:  # rotary embeddings rotate pairs of dimensions
            return [bad("hidden", f"/ heads ({self.hidden // self.heads}) must be even (the head size)")]
        return []


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                stage: str | None = None) -> Any:
    """Build `cls` from a YAML file plus `key=value` overrides, validated.

    Overrides use dotted keys for nested sections (`train.lr=1e-4`) and YAML syntax for values
    (`lora.target=[q_proj,v_proj]`). With `stage`, the file may also use the flat names of TRL and
    LLaMA-Factory (align/hf_names.py).
    """
    return build_config(cls, config_dict(cls, path, overrides, stage)[0])


def config_dict(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                stage: str | None = None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The config as a dict of align's keys, and the flat TRL / LLaMA-Factory keys it translated."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    used: list[tuple[str, str]] = []
    if stage is not None:
        from align.hf_names import nearest_hf_key, table, translate

        fields = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields and key not in table(stage):
                near = nearest_hf_key(str(key), stage)
                if near is not None:
                    raise ConfigError(f"unknown config key '{key}'; did you mean '{near}' (the TRL / LLaMA-Factory "
                                      "name)?")
        data, used = translate(stage, data)
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data, used


def build_config(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """The one loader: `from_dict` (keys and types), then `validate()` (ranges and relations).
    `prefix` names the keys as a recipe does (`sft.train.lr`)."""
    cfg = from_dict(cls, data, prefix)
    try:
        cfg.validate()
    except ConfigError as e:
        if not prefix:
            raise
        # validate() names keys from the command's top level: name them as the recipe does.
        raise ConfigError(str(e).replace("key '", f"key '{prefix}")) from None
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    from align.yaml_io import read_yaml as read_strict  # duplicate keys and alias bombs refused

    return read_strict(path)


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


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of `cls`, dotted (for suggestions)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def suggestion(cls: type, key: str, prefix: str) -> str:
    """`; did you mean ...?` for an unknown key of `cls`: a key of that name in a nested section
    (`lr` -> `train.lr`), else the nearest key of this section, else the valid keys."""
    fields = [f.name for f in dataclasses.fields(cls)]
    nested = [k for k in dotted_keys(cls) if "." in k and k.rsplit(".", 1)[1] == key]
    if nested:
        return f"; did you mean '{prefix}{nested[0]}'?"
    near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
    if near:
        return f"; did you mean '{prefix}{near[0]}'?"
    return f"; valid keys: {', '.join(fields)}"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Recursively build dataclass `cls` from `data`, rejecting unknown keys and wrong types (every
    such problem of `data` reported at once). A section absent from `data` keeps the command's
    default for it, and a section present starts from that default (`base`): a `ppo:` section of
    `align grpo` changes only the keys it names."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (a mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = base if base is not None else cls()
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        try:
            if key not in fields:
                raise ConfigError(f"unknown config key '{dotted}'{suggestion(cls, str(key), prefix)}")
            hint = hints[key]
            if dataclasses.is_dataclass(hint):
                kwargs[key] = from_dict(hint, value if value is not None else {}, f"{dotted}.", getattr(base, key))
            else:
                kwargs[key] = check_type(dotted, value, hint)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return dataclasses.replace(base, **kwargs)


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
