"""What a stage driven by a TRL trainer (`dpo`) needs from align, written once.

- `translate`: TRL's logged keys -> our metrics.jsonl names, where the meaning is the same;
- `AlignCallback`: a TrainerCallback that writes the translated logs through our MetricsLogger (with
  throughput), and marks each TRL checkpoint as ours (`checkpoints/latest`, `trainer_state.pt`) so
  `--resume` and `align run` find it as they find any stage's;
- `training_arguments`: our TrainConfig-style settings as TRL config keyword arguments;
- `train_and_finish`: train (resuming when asked), write model/ atomically, then summary.json last.

A TRL stage's run directory is every stage's: config.yaml, metrics.jsonl, checkpoints/ (TRL's
`checkpoint-N` directories), model/, summary.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from align.checkpoint import load_trainer_state
from align.modeling import save_model
from align.rundir import RunDir, atomic_write_text, finish_model, write_summary
from align.runtime import MetricsLogger, peak_memory_mb, progress

# TRL key -> our key. Keys not listed keep TRL's name (they are TRL-namespaced already).
TRANSLATION: dict[str, str] = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "lr",
    "num_tokens": "tokens_seen",
    "entropy": "policy/entropy_avg",  # mean per-token entropy of the policy, as PPO's policy/entropy_avg
    # DPO: the implicit reward beta x log(pi / pi_ref); accuracy and margin mean what the RM's do
    "rewards/accuracies": "train/accuracy",
    "rewards/margins": "train/margin",
}
DROPPED = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
           "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def translate(logs: dict[str, Any]) -> dict[str, Any]:
    """One TRL log dict in our names. `eval_*` keys become `val/*`."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if key in DROPPED or not isinstance(value, (int, float)) or key in ("epoch", "eval_num_tokens"):
            continue
        if key.startswith("eval_"):  # eval_loss -> val/loss, eval_rewards/chosen -> val/rewards/chosen
            base = key[len("eval_"):]
            name = TRANSLATION.get(base, "")
            out["val/" + (name[len("train/"):] if name.startswith("train/") else base)] = value
        else:
            out[TRANSLATION.get(key, key)] = value
    if out and "epoch" in logs:
        out["epoch"] = logs["epoch"]
    return out


class AlignCallback(TrainerCallback):
    """Writes each TRL log through our MetricsLogger, adds throughput, and marks checkpoints.

    `samples_per_step`: examples (DPO: pairs; RL: episodes) per optimizer step, all processes, for
    `<unit>_per_sec`."""

    def __init__(self, run: RunDir, logger: MetricsLogger, samples_per_step: int, unit: str, stage: str,
                 t_offset: float = 0.0):
        self.run, self.logger, self.samples_per_step, self.unit, self.stage = run, logger, samples_per_step, unit, stage
        self.bar: Any = None
        """Our progress bar (align.runtime.progress), in place of TRL's, so the stage's output reads
        as every other stage's."""
        self.postfix: dict[str, str] = {}
        self.last = (time.perf_counter(), 0, 0.0)  # (time, step, tokens) at the last log
        self.t_start = time.perf_counter() - t_offset
        self.tokens_seen = 0.0
        self.last_eval: tuple[int, dict[str, Any]] = (-1, {})
        """(step, metrics) of the latest evaluation."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.last = (time.perf_counter(), state.global_step, self.tokens_seen)
        self.bar = progress(state.max_steps, state.global_step, self.stage, state.is_world_process_zero)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bar.close()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        metrics = translate(logs or {})
        if not metrics:
            return
        if any(k.startswith("val/") for k in metrics):
            self.last_eval = (state.global_step, metrics)
        now = time.perf_counter()
        t0, step0, tokens0 = self.last
        self.tokens_seen = float(metrics.get("tokens_seen", self.tokens_seen))
        if "train/loss" in metrics and state.global_step > step0:  # a training log, not an eval one
            dt = max(now - t0, 1e-9)
            metrics[f"{self.unit}_per_sec"] = (state.global_step - step0) * self.samples_per_step / dt
            metrics["tokens_per_sec"] = (self.tokens_seen - tokens0) / dt
            if self.unit == "episodes":  # PPO's `episode`: responses sampled so far
                metrics["episode"] = state.global_step * self.samples_per_step
            metrics["peak_memory_mb"] = peak_memory_mb()
            self.last = (now, state.global_step, self.tokens_seen)
            self.postfix["loss"] = f"{metrics['train/loss']:.4f}"
        if "val/loss" in metrics:
            self.postfix["val"] = f"{metrics['val/loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix)
        self.logger.log(state.global_step, metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """TRL has written `checkpoint-N` in full: point `checkpoints/latest` at it, with the
        `trainer_state.pt` our resume logic looks for (training time so far, tokens seen)."""
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        path = self.run.checkpoints / name
        if path.is_dir():
            torch.save({"train_time": time.perf_counter() - self.t_start, "tokens_seen": self.tokens_seen,
                        "step": state.global_step}, path / "trainer_state.pt")
            atomic_write_text(self.run.checkpoints / "latest", name)


def training_arguments(run: RunDir, *, seed: int, lr: float, batch_size: int, grad_accum: int, max_steps: int,
                       warmup_steps: int = 0, lr_scheduler_type: str = "cosine_with_min_lr",
                       lr_scheduler_kwargs: dict[str, Any] | None = None, weight_decay: float = 0.0,
                       adam_betas: list[float] | tuple[float, float] = (0.9, 0.999), max_grad_norm: float = 1.0,
                       mixed_precision: str = "auto", log_every: int = 1, save_every: int = 500,
                       keep_checkpoints: int = 2, gradient_checkpointing: bool = False,
                       disable_dropout: bool = True) -> dict[str, Any]:
    """Keyword arguments of a TRL config (DPOConfig), from ours. The schedule is a
    `transformers.get_scheduler` type, built by TRL's trainer from these arguments exactly as
    `align.runtime.make_scheduler` builds it for the other stages (`lr_scheduler_kwargs`: from
    `align.runtime.scheduler_kwargs`). Progress is drawn by AlignCallback, not TRL's bar."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {
        "output_dir": str(run.checkpoints), "seed": seed, "data_seed": seed, "learning_rate": lr,
        "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum, "max_steps": max_steps,
        "warmup_steps": warmup_steps, "lr_scheduler_type": lr_scheduler_type,
        "lr_scheduler_kwargs": dict(lr_scheduler_kwargs or {}), "weight_decay": weight_decay,
        "adam_beta1": adam_betas[0], "adam_beta2": adam_betas[1], "max_grad_norm": max_grad_norm,
        "bf16": mixed_precision == "bf16", "fp16": mixed_precision == "fp16",
        "logging_steps": log_every, "save_strategy": "steps", "save_steps": save_every,
        "save_total_limit": keep_checkpoints, "gradient_checkpointing": gradient_checkpointing,
        "disable_dropout": disable_dropout, "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0, "dataloader_pin_memory": torch.cuda.is_available(),
    }


def train_and_finish(trainer: Any, run: RunDir, logger: MetricsLogger, callback: AlignCallback, tokenizer: Any,
                     resume_from: Path | None, merge_lora: bool, summary: dict[str, Any],
                     t_start: float) -> dict[str, Any]:
    """Train (from `resume_from` when given), evaluate once more when there is an eval set, write
    model/ atomically, then summary.json last. `summary` holds the stage's own keys (stage,
    episodes, ...); steps, time (`t_start`: when the command began), tokens and memory are added."""
    t0 = time.perf_counter()
    prior = load_trainer_state(resume_from) if resume_from is not None else {}
    callback.t_start = t0 - prior.get("train_time", 0.0)
    callback.tokens_seen = prior.get("tokens_seen", 0.0)
    trainer.remove_callback(PrinterCallback)  # with TRL's bar off (disable_tqdm) it prints each log dict; ours shows them
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    train_time = time.perf_counter() - callback.t_start
    if trainer.eval_dataset is not None and callback.last_eval[0] != trainer.state.global_step:
        trainer.evaluate()  # logged through the callback
    last_val = callback.last_eval[1]
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        finish_model(run, lambda path: save_model(model, tokenizer, path, merge_lora=merge_lora))
    trainer.accelerator.wait_for_everyone()
    summary = {**summary, "steps": trainer.state.global_step, "tokens_seen": int(callback.tokens_seen),
               "wall_time_sec": time.time() - t_start, "train_time_sec": train_time, "peak_memory_mb": peak_memory_mb(),
               **last_val}
    if trainer.is_world_process_zero():
        write_summary(run, summary)
    logger.close()
    return summary
