"""What every stage driven by a TRL trainer (`dpo`, and the RL ones) shares, written once.

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
from transformers import TrainerCallback

from align.modeling import save_model
from align.runtime import (MetricsLogger, RunDir, atomic_write_text, finish_model, load_trainer_state, peak_memory_mb,
                           write_summary)

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
    # GRPO / RLOO
    "reward": "objective/scores",
    "completions/mean_length": "response_length",
    "clip_ratio/region_mean": "policy/clipfrac_avg",
    "policy_loss": "loss/policy_avg",
}
DROPPED = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
           "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def translate(logs: dict[str, Any]) -> dict[str, Any]:
    """One TRL log dict in our names. `eval_*` keys become `val/*`. Two derived keys:
    - `objective/kl`: TRL logs `kl` as a mean per response token; ours (PPO's) is the KL summed over
      a response, so it is `kl x completions/mean_length` (exact when both come from one batch, as
      in RLOO; in GRPO `kl` is averaged over the update's micro-batches). TRL's value stays as
      `objective/kl_per_token`.
    - `eos_rate` = 1 - `completions/clipped_ratio` (the share of responses that ended with EOS)."""
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
    if "kl" in logs:
        out.pop("kl", None)
        out["objective/kl_per_token"] = logs["kl"]
        if "completions/mean_length" in logs:
            out["objective/kl"] = logs["kl"] * logs["completions/mean_length"]
    if "completions/clipped_ratio" in logs:
        out["eos_rate"] = 1.0 - logs["completions/clipped_ratio"]
    return out


class AlignCallback(TrainerCallback):
    """Writes each TRL log through our MetricsLogger, adds throughput, and marks checkpoints.

    `samples_per_step`: examples (DPO: pairs; RL: episodes) per optimizer step, all processes, for
    `<unit>_per_sec`."""

    def __init__(self, run: RunDir, logger: MetricsLogger, samples_per_step: int, unit: str, t_offset: float = 0.0):
        self.run, self.logger, self.samples_per_step, self.unit = run, logger, samples_per_step, unit
        self.last = (time.perf_counter(), 0, 0.0)  # (time, step, tokens) at the last log
        self.t_start = time.perf_counter() - t_offset
        self.tokens_seen = 0.0
        self.last_eval: tuple[int, dict[str, Any]] = (-1, {})
        """(step, metrics) of the latest evaluation."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.last = (time.perf_counter(), state.global_step, self.tokens_seen)

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
                       warmup_steps: int = 0, min_lr_ratio: float = 0.0, weight_decay: float = 0.0,
                       adam_betas: list[float] | tuple[float, float] = (0.9, 0.999), max_grad_norm: float = 1.0,
                       mixed_precision: str = "auto", log_every: int = 1, save_every: int = 500,
                       keep_checkpoints: int = 2, gradient_checkpointing: bool = False,
                       disable_dropout: bool = True) -> dict[str, Any]:
    """Keyword arguments every TRL config (DPOConfig, GRPOConfig, RLOOConfig) takes, from ours.
    The schedule is ours: linear warmup, then cosine decay to `min_lr_ratio` x lr."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {
        "output_dir": str(run.checkpoints), "seed": seed, "data_seed": seed, "learning_rate": lr,
        "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum, "max_steps": max_steps,
        "warmup_steps": warmup_steps, "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": min_lr_ratio}, "weight_decay": weight_decay,
        "adam_beta1": adam_betas[0], "adam_beta2": adam_betas[1], "max_grad_norm": max_grad_norm,
        "bf16": mixed_precision == "bf16", "fp16": mixed_precision == "fp16",
        "logging_steps": log_every, "save_strategy": "steps", "save_steps": save_every,
        "save_total_limit": keep_checkpoints, "gradient_checkpointing": gradient_checkpointing,
        "disable_dropout": disable_dropout, "report_to": "none", "disable_tqdm": False,
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


# ----------------------------------------------------------------------------------------------
# The group-baseline RL stages (GRPO, RLOO): PPO's prompts and reward, TRL's trainer


class RewardForTRL:
    """align's Reward as the callable TRL's GRPO and RLOO trainers call:
    `(prompts, completions, completion_ids, align_index, **kw) -> list[float]`.

    Not the sequence classifier itself: TRL would score `prompt + completion` text re-tokenized
    without BOS or EOS and read the classifier raw, while our reward models were trained on
    `[BOS] prompt response EOS` and store a bias (`model/align_reward.json`) to subtract. Here the
    policy's own ids are scored as PPO scores them: our prompt ids (found by `align_index`, a
    dataset column) + TRL's completion ids (EOS included when sampled), then `reward.clip` and
    the missing-EOS penalty as in PPO."""

    __name__ = "align_reward"  # TRL names the reward's metrics after it: rewards/align_reward/mean

    def __init__(self, reward: Any, prompts: list[Any], tokenizer: Any, clip: float | None,
                 missing_eos_penalty: float | None):
        self.reward, self.prompts, self.tokenizer = reward, prompts, tokenizer
        self.clip, self.missing_eos_penalty = clip, missing_eos_penalty

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 align_index: list[int], **kw: Any) -> list[float]:
        from align.generation import Rollout, decode_responses, left_pad

        tok = self.tokenizer
        device = self.reward.device
        chunk = [self.prompts[i] for i in align_index]
        prompt_ids, prompt_mask = left_pad([q.ids for q in chunk], tok.pad_token_id, device)  # (B, P)
        width = max(1, max(len(c) for c in completion_ids))
        response_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long, device=device)  # (B, R)
        response_mask = torch.zeros_like(response_ids)
        for i, c in enumerate(completion_ids):
            response_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long, device=device)
            response_mask[i, :len(c)] = 1
        has_eos = torch.tensor([len(c) > 0 and c[-1] == tok.eos_token_id for c in completion_ids], device=device)
        rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, has_eos)
        texts = decode_responses(tok, rollout)
        scores = self.reward.scores([q.text for q in chunk], texts, rollout, [tok.decode(q.ids) for q in chunk])
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~has_eos).float()
        return scores.float().cpu().tolist()


def train_group_rl(cfg: Any, stage: str, trainer_cls: Any, config_cls: Any, stage_args: dict[str, Any],
                   resume: bool, force: bool, dry_run: bool) -> dict[str, Any]:
    """A GRPO or RLOO run: PPO's prompts (our template and ids), the reward wrapped for TRL, the
    policy from the SFT model (the reference is built by TRL from the same path, or is the policy
    with its adapter disabled under LoRA), then TRL's trainer with our callback and run directory."""
    from accelerate import PartialState

    from align import data as D
    from align.bundle import Reward, load_reward_function
    from align.errors import AlignError
    from align.modeling import context_length, inspect_model, load_pretrained, load_tokenizer, peft_lora_config
    from align.runtime import prepare_run_dir, set_seed

    t_start = time.time()
    state = PartialState()
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, state.is_main_process, force, dry_run)
    r, d = cfg.rl, cfg.data

    # ---- inputs checked before any weight is loaded
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               key="model.tokenizer" if cfg.model.tokenizer else "model.path")
    configs = [inspect_model(cfg.model.path, "model.path", cfg.model.trust_remote_code)]
    if cfg.reward.function:
        load_reward_function(cfg.reward.function, "reward.function")
    else:
        configs.append(inspect_model(cfg.reward.model, "reward.model", cfg.model.trust_remote_code))
    prompts, report = D.load_prompts(d.train, d.format, d.prompt_template, tokenizer, d.max_length, d.truncation,
                                     d.split, d.max_samples, context_length(*configs),
                                     r.response_length)
    global_batch = r.rollout_batch_size * state.num_processes
    n_steps = r.total_episodes // global_batch
    if len(prompts) < global_batch // r.num_generations:
        raise AlignError(f"{len(prompts)} prompts make no batch of {global_batch // r.num_generations} prompts "
                         f"(rl.rollout_batch_size / rl.num_generations x processes)")
    if dry_run:
        return {"stage": stage, "output_dir": cfg.output_dir, "policy": cfg.model.path,
                "reward": cfg.reward.model or cfg.reward.function,
                "data": f"{report.kept} prompts ({report.dropped} dropped as longer than {d.max_length} tokens)",
                "steps": n_steps, "episodes_per_step": global_batch,
                "prompts_per_step": global_batch // r.num_generations}

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    policy = load_pretrained(AutoModelForCausalLM, cfg.model, tokenizer, trainable=True)
    reward = Reward(tokenizer, state.device, model=cfg.reward.model, function=cfg.reward.function,
                    dtype=cfg.model.dtype, normalize=cfg.reward.normalize)
    reward_fn = RewardForTRL(reward, prompts, tokenizer, cfg.reward.clip, cfg.reward.missing_eos_penalty)
    # TRL tokenizes each prompt string with the tokenizer's special tokens, as our ids were built.
    rows = [{"prompt": tokenizer.decode(q.ids, skip_special_tokens=True), "align_index": i}
            for i, q in enumerate(prompts)]
    grad_accum = r.rollout_batch_size // r.micro_batch_size
    args = config_cls(**training_arguments(
        # each sampled batch serves num_iterations optimizer steps (TRL's `num_iterations`)
        run, seed=cfg.seed, lr=r.lr, batch_size=r.micro_batch_size, grad_accum=grad_accum,
        max_steps=n_steps * r.num_iterations, warmup_steps=r.warmup_steps, weight_decay=r.weight_decay,
        adam_betas=r.adam_betas,
        max_grad_norm=r.max_grad_norm, mixed_precision=r.mixed_precision, log_every=r.log_every,
        save_every=r.save_every, keep_checkpoints=r.keep_checkpoints,
        gradient_checkpointing=cfg.model.gradient_checkpointing, disable_dropout=cfg.model.disable_dropout),
        num_generations=r.num_generations, max_completion_length=r.response_length, temperature=r.temperature,
        top_k=0, top_p=1.0, beta=r.kl_coef, epsilon=r.clip_eps, num_iterations=r.num_iterations,
        steps_per_generation=grad_accum, **stage_args)
    ckpt = run.latest_checkpoint() if resume else None
    logger = MetricsLogger(run, state.is_main_process, load_trainer_state(ckpt)["step"] if ckpt else None)
    callback = AlignCallback(run, logger, global_batch // r.num_iterations, unit="episodes")
    trainer = trainer_cls(model=policy, reward_funcs=[reward_fn], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[callback],
                          peft_config=peft_lora_config(cfg.lora) if cfg.lora.enabled else None)
    if state.is_main_process:
        print(f"{stage}: {report.kept} prompts ({report.dropped} dropped as longer than {d.max_length} tokens); "
              f"{n_steps} steps of {global_batch // r.num_generations} prompts x {r.num_generations} responses; "
              f"reward: {cfg.reward.model or cfg.reward.function}", flush=True)
    return train_and_finish(trainer, run, logger, callback, tokenizer, ckpt, cfg.lora.merge,
                            {"stage": stage, "episodes": n_steps * global_batch}, t_start)
