"""The names users already type: a flat TRL config (`SFTConfig`, `RewardConfig`, `DPOConfig`,
`GRPOConfig` arguments, as in TRL's example YAMLs) or a LLaMA-Factory training YAML, mapped onto
align's sections with the meaning those projects give them. Torch-free.

`translate(stage, data)` rewrites every recognised flat key of a config file into align's dotted
key (`learning_rate` -> `train.lr`, or `ppo.lr` for an RL stage) and returns the mapping it used,
which `--print-config` shows. A key that has a meaning there but none here is an error saying so,
never silently dropped; keys that only steer those programs' own machinery (`do_train`,
`overwrite_output_dir`, `plot_loss`, ...) are accepted and listed as ignored. docs/coming-from.md
has the table.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from align.config import SCHEDULER_NAMES, TRACKER_NAMES
from align.errors import ConfigError

SUPERVISED = {"sft", "rm", "dpo"}
"""Stages whose optimisation section is `train`; the RL stages use `ppo`."""

Value = Callable[[Any], list[tuple[str, Any]]]


def _to(key: str) -> Value:
    return lambda v: [(key, v)]


def _opt(key: str) -> Callable[[str], Value]:
    """A key of the optimisation section: `train.<key>` or `ppo.<key>` by stage."""
    return lambda section: _to(f"{section}.{key}")


def _max_steps(section: str) -> Value:
    return lambda v: [] if v in (-1, None) else [(f"{section}.max_steps", v)]


def _precision(kind: str, section: str) -> Value:
    return lambda v: [(f"{section}.mixed_precision", kind)] if v else []


def _beta(index: int, section: str) -> Value:
    return lambda v: [(f"{section}.adam_betas[{index}]", v)]


def _scheduler(section: str) -> Value:
    def convert(v: Any) -> list[tuple[str, Any]]:
        if v in ("reduce_lr_on_plateau", "greedy"):
            raise ConfigError(f"config key 'lr_scheduler_type': '{v}' steps on a metric, and align steps the schedule "
                              "once per optimizer step with none; use one of " + ", ".join(SCHEDULER_NAMES))
        if v not in SCHEDULER_NAMES:
            raise ConfigError(f"config key 'lr_scheduler_type' must be one of {', '.join(SCHEDULER_NAMES)} (got {v!r})")
        return [(f"{section}.lr_scheduler_type", v)]
    return convert


def _scheduler_kwargs(section: str) -> Value:
    def convert(v: Any) -> list[tuple[str, Any]]:
        if isinstance(v, str):  # HF accepts the dict as a JSON string too (from its command line)
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError:
                v = None
        if not isinstance(v, dict):
            raise ConfigError("config key 'lr_scheduler_kwargs' must be a mapping (or its JSON string)")
        return [(f"{section}.lr_scheduler_kwargs", v)]
    return convert


def _warmup_steps(section: str) -> Value:
    """transformers 5 reads a `warmup_steps` below 1 as a fraction of the run (its `warmup_ratio`)."""
    return lambda v: [(f"{section}.warmup_ratio", v)] if isinstance(v, float) and 0 < v < 1 else \
        [(f"{section}.warmup_steps", int(v) if isinstance(v, float) and v.is_integer() else v)]


def _report_to(section: str) -> Value:
    """HF's `report_to`: `none`, `all` (every installed tracker of the four), a name or a list."""
    def convert(v: Any) -> list[tuple[str, Any]]:
        names = [v] if isinstance(v, str) else list(v or [])
        if "none" in names or not names:
            return [(f"{section}.report_to", [])]
        if "all" in names:
            import importlib.util

            return [(f"{section}.report_to", [n for n in TRACKER_NAMES if importlib.util.find_spec(n)])]
        unknown = [n for n in names if n not in TRACKER_NAMES]
        if unknown:
            raise ConfigError(f"config key 'report_to': {', '.join(map(str, unknown))} is not available; align reports "
                              f"to {', '.join(TRACKER_NAMES)} (or none); metrics.jsonl is always written")
        return [(f"{section}.report_to", names)]
    return convert


def _finetuning_type(v: Any) -> list[tuple[str, Any]]:
    if v not in ("lora", "full"):
        raise ConfigError(f"config key 'finetuning_type': '{v}' is not available; use lora or full")
    return [("lora.enabled", v == "lora")]


def _lora_target(v: Any) -> list[tuple[str, Any]]:
    if v == "all" or v == "all-linear":
        return [("lora.target", "all")]
    names = [t.strip() for t in v.split(",")] if isinstance(v, str) else list(v)
    return [("lora.target", names)]


def _template(v: Any) -> list[tuple[str, Any]]:
    """LLaMA-Factory's `template` names a chat format. `alpaca` and `default` are prompt templates
    here; any other name means "the tokenizer's own chat template", which align applies to chat
    records (`{"messages": [...]}`) by itself."""
    if v == "alpaca":
        return [("data.prompt_template", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")]
    if v == "default":
        return [("data.prompt_template", "Human: {prompt}\nAssistant: ")]
    return []


def _grpo_loss(v: Any) -> list[tuple[str, Any]]:
    modes = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
             "dr_grpo": "seq-mean-token-sum-norm"}
    if v not in modes:
        raise ConfigError(f"config key 'loss_type': '{v}' is not available for GRPO here; use one of "
                          f"{', '.join(modes)}")
    return [("ppo.loss_agg", modes[v])]


def _scale_rewards(v: Any) -> list[tuple[str, Any]]:
    if v in ("group", True):
        return [("ppo.estimator", "grpo")]
    if v in ("none", False):
        return [("ppo.estimator", "dr_grpo")]
    raise ConfigError(f"config key 'scale_rewards': '{v}' is not available; use group (GRPO) or none (Dr. GRPO)")


IGNORED = {
    "do_train", "do_eval", "overwrite_output_dir", "overwrite_cache", "preprocessing_num_workers", "plot_loss",
    "ddp_timeout", "dataloader_num_workers", "eval_strategy", "evaluation_strategy", "save_strategy",
    "logging_strategy", "logging_dir", "run_name", "push_to_hub", "hub_model_id", "save_only_model",
    "remove_unused_columns", "dataset_dir", "val_size", "per_device_eval_batch_size", "packing",
    "model_type", "dataset_text_field", "stage", "completion_only_loss", "assistant_only_loss",
}
"""Keys that steer TRL's / LLaMA-Factory's own machinery and mean nothing to align's result
(align always masks prompts, always writes its run directory, packs when exact, ...)."""


def table(stage: str) -> dict[str, Value]:
    """The flat-key mapping for one stage."""
    s = "train" if stage in SUPERVISED else "ppo"
    out: dict[str, Value] = {
        "model_name_or_path": _to("model.path"), "tokenizer_name_or_path": _to("model.tokenizer"),
        "trust_remote_code": _to("model.trust_remote_code"), "gradient_checkpointing": _to("model.gradient_checkpointing"),
        "learning_rate": _opt("lr")(s), "weight_decay": _opt("weight_decay")(s),
        "max_grad_norm": _opt("max_grad_norm")(s), "adam_beta1": _beta(0, s), "adam_beta2": _beta(1, s),
        "bf16": _precision("bf16", s), "fp16": _precision("fp16", s), "lr_scheduler_type": _scheduler(s),
        "lr_scheduler_kwargs": _scheduler_kwargs(s), "warmup_steps": _warmup_steps(s),
        "warmup_ratio": _opt("warmup_ratio")(s),
        "logging_steps": _opt("log_every")(s), "save_steps": _opt("save_every")(s),
        "save_total_limit": _opt("keep_checkpoints")(s), "report_to": _report_to(s),
        "dataset_name": _to("data.train"), "dataset": _to("data.train"), "dataset_train_split": _to("data.split"),
        "dataset_config": _to("data.dataset_config"), "dataset_config_name": _to("data.dataset_config"),
        "max_samples": _to("data.max_samples"),
        "finetuning_type": _finetuning_type, "lora_target": _lora_target, "lora_target_modules": _lora_target,
        "lora_r": _to("lora.r"), "lora_rank": _to("lora.r"), "lora_alpha": _to("lora.alpha"),
        "lora_dropout": _to("lora.dropout"), "template": _template, "use_peft": _to("lora.enabled"),
    }
    if s == "train":
        out.update({
            "per_device_train_batch_size": _to("train.batch_size"), "gradient_accumulation_steps": _to("train.grad_accum"),
            "num_train_epochs": _to("train.epochs"), "max_steps": _max_steps("train"),
            "eval_steps": _to("train.eval_every"), "max_length": _to("data.max_length"),
            "cutoff_len": _to("data.max_length"), "dataset_test_split": _to("data.validation_split"),
        })
    if stage == "dpo":
        out.update({"beta": _to("beta"), "pref_beta": _to("beta"), "loss_type": _to("loss_type"),
                    "pref_loss": _to("loss_type"), "ref_model": _to("reference")})
    if s == "ppo":
        out.update({
            "num_generations": _to("ppo.n_samples_per_prompt"), "max_completion_length": _to("ppo.response_length"),
            "max_new_tokens": _to("ppo.response_length"), "temperature": _to("ppo.temperature"),
            "epsilon": _to("ppo.clip_eps"), "epsilon_high": _to("ppo.clip_eps_high"), "beta": _to("ppo.kl_coef"),
            "num_iterations": _to("ppo.ppo_epochs"), "ppo_epochs": _to("ppo.ppo_epochs"),
            "per_device_train_batch_size": _to("ppo.micro_batch_size"), "max_prompt_length": _to("data.max_length"),
            "loss_type": _grpo_loss, "scale_rewards": _scale_rewards, "reward_model_path": _to("reward.model"),
            "reward_model": _to("reward.model"), "kl_coef": _to("ppo.kl_coef"), "cliprange": _to("ppo.clip_eps"),
            "cliprange_value": _to("ppo.value_clip_eps"), "vf_coef": _to("ppo.vf_coef"), "gamma": _to("ppo.gamma"),
            "lam": _to("ppo.lam"), "total_episodes": _to("ppo.total_episodes"),
        })
    return out


def _set(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{source}' maps to '{dotted}', but '{part}' is not a section")
    if last.endswith("]"):  # adam_betas[0]
        name, index = last[:-1].split("[")
        betas = node.setdefault(name, [0.9, 0.999])
        betas[int(index)] = value
        return
    if last in node and node[last] != value:
        raise ConfigError(f"config key '{source}' maps to '{dotted}', which the file also sets to {node[last]!r}; "
                          "keep one of them")
    node[last] = value


def translate(stage: str, data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """(align config dict, [(flat key, what it became)]). Keys that are align's own pass through."""
    mapping = table(stage)
    out: dict[str, Any] = {}
    used: list[tuple[str, str]] = []
    flat = {k: v for k, v in data.items() if k in mapping or k in IGNORED}
    if "stage" in flat and flat["stage"] != stage:
        raise ConfigError(f"config key 'stage' is '{flat['stage']}', but this is `align {stage}`; run "
                          f"`align {flat['stage']}` with this file")
    for key, value in data.items():
        if key not in flat:
            out[key] = value
    for key, value in flat.items():
        if key in IGNORED:
            used.append((key, "ignored (no effect in align)"))
            continue
        pairs = mapping[key](value)
        for dotted, v in pairs:
            _set(out, dotted, v, key)
        used.append((key, ", ".join(f"{d} = {v!r}" for d, v in pairs) or "the default (same meaning)"))
    return out, used


def nearest_hf_key(key: str, stage: str) -> str | None:
    """For "did you mean": the align key a misspelt HF name would have meant (`learning_rat` ->
    `learning_rate` -> `train.lr`)."""
    import difflib

    mapping = table(stage)
    near = difflib.get_close_matches(key, list(mapping), n=1, cutoff=0.8)
    return near[0] if near else None
