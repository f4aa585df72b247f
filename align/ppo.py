"""`align ppo`: RLHF with PPO. One step, top to bottom (DESIGN.md; CleanRL's loop; Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO"):

1. rollout: the actor samples a response per prompt (KV cache, batched, left padding);
2. truncate after the first EOS; a response without EOS gets `reward.missing_eos_penalty`;
3. score without grad: reward per sequence, reference and old actor log-probs and values per token
   (the last two from the first update's forward when one forward covers the rollout);
4. per-token reward r_t = -beta * kl_t, plus the score on the last response token;
5. GAE(gamma, lambda) over response tokens, returns = advantages + values; whiten advantages;
6. ppo_epochs x shuffled minibatches: clipped policy loss + vf_coef x clipped value loss
   (- ent_coef x entropy), every loss a mean over the minibatch's response tokens.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from align import data as D
from align.bundle import ModelBundle, build_bundle, load_reward_function, call_reward_function
from align.config import LoraConfig, PPOConfig, PPOLoopConfig
from align.errors import AlignError
from align.generation import decode_responses, sample
from align.modeling import context_length, count_parameters, inspect_model, load_tokenizer, parameter_counts, save_model
from align.ops import entropy_from_logits, masked_mean, masked_whiten
from align.rl import (AdaptiveKLController, FixedKLController, gae, kl_estimate, per_token_rewards, policy_loss,
                      value_loss)
from align.runtime import (Checkpointer, MetricsLogger, NonFiniteGuard, StopRequest, Stopped, finish_model,
                           linear_decay, load_trainer_state, make_accelerator, make_optimizer, peak_memory_mb,
                           prepare_run_dir, progress, rng_state, set_rng_state, set_seed, write_summary)


@torch.no_grad()
def evaluate(bundle: ModelBundle, actor: Any, tokenizer: Any, prompts: list[D.Prompt], cfg: PPOConfig,
             gold: Any) -> dict[str, float]:
    """Greedy responses on the held-out prompts, scored by the learned reward (and the gold one)."""
    p = cfg.ppo
    scores, golds, lengths, eos = [], [], [], []
    for s in range(0, len(prompts), p.rollout_batch_size):
        chunk = prompts[s:s + p.rollout_batch_size]
        rollout = sample(actor, tokenizer, [q.ids for q in chunk], p.response_length, greedy=True)
        texts = decode_responses(tokenizer, rollout)
        raw = [q.text for q in chunk]
        scores.append(bundle.reward.scores(raw, texts, rollout, [tokenizer.decode(q.ids, skip_special_tokens=True) for q in chunk]).cpu())
        if gold is not None:
            golds.append(call_reward_function(gold, cfg.eval.gold_reward, raw, texts))
        lengths.append(rollout.response_mask.sum(1).float().cpu())
        eos.append(rollout.has_eos.float().cpu())
    out = {"eval/reward": torch.cat(scores).mean().item(), "eval/response_length": torch.cat(lengths).mean().item(),
           "eval/eos_rate": torch.cat(eos).mean().item()}
    if golds:
        out["eval/gold_reward"] = torch.cat(golds).mean().item()
    return out


def drift_warnings(metrics: dict[str, float], first_length: float, p: Any) -> dict[str, bool]:
    """Flags for the usual signs of a run going wrong: KL or clip fraction or value error too
    high, or the response length collapsing or exploding (reward hacking)."""
    length = metrics["response_length"]
    return {
        "guard/kl_high": metrics["objective/kl"] > p.warn_kl,
        "guard/clipfrac_high": metrics["policy/clipfrac_avg"] > p.warn_clipfrac,
        "guard/value_loss_high": metrics["loss/value_avg"] > p.warn_value_loss,
        "guard/length_drift": first_length > 0 and not (first_length / p.warn_length_ratio <= length
                                                        <= first_length * p.warn_length_ratio),
    }


def check_models(cfg: PPOConfig, tokenizer: Any) -> dict[str, Any]:
    """Check every model input without loading a weight: actor, critic and reward model paths
    (config and weight files), the reward function's import, and vocabularies. A reward model
    whose vocabulary differs from the actor's scores through text (responses decoded and
    re-tokenized: `text_bridge`); the critic reads the actor's ids, so it must share its vocabulary."""
    trust, vocab = cfg.model.trust_remote_code, tokenizer.get_vocab()
    found: dict[str, Any] = {"actor": inspect_model(cfg.model.path, "model.path", trust), "text_bridge": False}
    critic_key = "critic.path" if cfg.critic.path else "reward.model" if cfg.reward.model else "model.path"
    critic_path = cfg.critic.path or cfg.reward.model or cfg.model.path
    found["critic"] = inspect_model(critic_path, critic_key, trust)
    if cfg.reward.function:
        load_reward_function(cfg.reward.function, "reward.function")
    else:
        found["reward"] = inspect_model(cfg.reward.model, "reward.model", trust)
        found["text_bridge"] = load_tokenizer(cfg.reward.model, key="reward.model").get_vocab() != vocab
    if critic_path != cfg.model.path and load_tokenizer(critic_path, key=critic_key).get_vocab() != vocab:
        raise AlignError(f"config key '{critic_key}': the critic would start from '{critic_path}', whose vocabulary "
                         f"differs from the actor's; set critic.path to the SFT model ('{cfg.model.path}')")
    return found


def ppo_plan(cfg: PPOConfig, found: dict[str, Any], data: str, n_steps: int, global_batch: int) -> dict[str, Any]:
    """What a PPO run would do (`--dry-run`). Checkpoint: actor and critic float32 weights (4 bytes
    per parameter, per adapter parameter with LoRA) plus AdamW's moments (8 bytes per trained one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = cfg.model.trust_remote_code
    lora = cfg.memory_mode == "lora"
    a_total, a_trained = parameter_counts(found["actor"], AutoModelForCausalLM,
                                          LoraConfig(**{**cfg.lora.__dict__, "enabled": lora}), trust)
    critic_config = copy.deepcopy(found["critic"])
    critic_config.num_labels = 1
    c_total, c_trained = parameter_counts(critic_config, AutoModelForSequenceClassification,
                                          LoraConfig(**{**cfg.lora.__dict__, "enabled": cfg.critic.lora}), trust)
    saved = 4 * ((a_trained if lora else a_total) + (c_trained if cfg.critic.lora else c_total))
    reward = cfg.reward.function or cfg.reward.model
    return {"stage": "ppo", "output_dir": cfg.output_dir, "actor": f"{cfg.model.path} ({cfg.memory_mode} mode)",
            "reference": "the actor with its adapter disabled" if lora else f"{cfg.model.path} (a frozen copy)",
            "critic": cfg.critic.path or cfg.reward.model or cfg.model.path,
            "reward": reward + (" (different vocabulary: scored through text)" if found["text_bridge"] else ""),
            "actor_parameters": a_total, "actor_trained_parameters": a_trained, "critic_parameters": c_total,
            "critic_trained_parameters": c_trained, "data": data, "steps": n_steps, "episodes_per_step": global_batch,
            "checkpoint_bytes": saved + 8 * (a_trained + c_trained),
            "final_model_bytes": 4 * (a_trained if lora and not cfg.lora.merge else a_total)}


def rollout_targets(p: PPOLoopConfig, whiten_rewards: bool, beta: float, logprobs: torch.Tensor,
                    ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Steps 4-5 from the rollout's (B, R) old log-probs, reference log-probs and values and its (B,)
    scores: the per-token KL and rewards, then GAE advantages (whitened) and returns."""
    kl = kl_estimate(logprobs, ref_logprobs, p.kl_estimator) * mask
    rewards, non_score_reward = per_token_rewards(scores, kl, mask, beta)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return {"logprobs": logprobs, "values": values, "kl": kl, "non_score_reward": non_score_reward,
            "advantages": advantages, "returns": returns}


def unshuffle(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in shuffled `order` (a permutation of all rows), detached, back in rollout order."""
    out = torch.empty_like(x, requires_grad=False)
    out[order] = x.detach()
    return out


def train_ppo(cfg: PPOConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train and return the summary; with `dry_run`, check every input and return the plan instead
    (nothing is loaded but configs and tokenizers, nothing is written)."""
    t_start = time.time()
    p = cfg.ppo
    accelerator = make_accelerator(p.mixed_precision)
    is_main, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                    accelerator.num_processes, accelerator.device)
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, is_main, force, dry_run)

    # ---- every input checked before any weight is loaded: models, prompts, eval prompts, rewards
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               key="model.tokenizer" if cfg.model.tokenizer else "model.path")
    found = check_models(cfg, tokenizer)
    if found["text_bridge"] and is_main:
        print("ppo: note: the reward model's tokenizer differs from the actor's; responses are decoded and "
              "re-tokenized for it (text bridge)", flush=True)
    d = cfg.data
    # prompt + response must fit every model that reads them (actor, critic, reward model)
    context = context_length(*(found[k] for k in ("actor", "critic", "reward") if k in found))
    prompts, report = D.load_prompts(d.train, d.format, d.prompt_template, tokenizer, d.max_length, d.truncation,
                                     d.split, d.max_samples, context, p.response_length)
    eval_prompts = D.load_prompts(cfg.eval.prompts, d.format, d.prompt_template, tokenizer, d.max_length,
                                  d.truncation, max_samples=cfg.eval.max_samples, context=context,
                                  new_tokens=p.response_length)[0] if cfg.eval.prompts else []
    gold = load_reward_function(cfg.eval.gold_reward, "eval.gold_reward") if cfg.eval.gold_reward else None
    global_batch = p.rollout_batch_size * world
    n_steps = p.total_episodes // global_batch
    if len(prompts) < global_batch or n_steps < 1:
        raise AlignError(f"{len(prompts)} prompts and ppo.total_episodes {p.total_episodes} make no rollout batch of "
                         f"{global_batch} (ppo.rollout_batch_size x {world} process(es)); lower ppo.rollout_batch_size")
    if dry_run:
        return ppo_plan(cfg, found, f"{report.kept} prompts ({report.dropped} dropped as longer than {d.max_length} "
                        f"tokens); {len(eval_prompts)} eval prompts", n_steps, global_batch)
    ckpt = run.latest_checkpoint() if resume else None
    bundle = build_bundle(cfg, tokenizer, device, ckpt)
    actor_opt = make_optimizer(bundle.actor.parameters(), p.lr, p.weight_decay, p.adam_betas)
    critic_opt = make_optimizer(bundle.critic.parameters(), cfg.critic.lr, p.weight_decay, p.adam_betas)
    actor_sched, critic_sched = linear_decay(actor_opt, n_steps), linear_decay(critic_opt, n_steps)
    actor, critic, actor_opt, critic_opt = accelerator.prepare(bundle.actor, bundle.critic, actor_opt, critic_opt)
    unwrapped_actor, unwrapped_critic = accelerator.unwrap_model(actor), accelerator.unwrap_model(critic)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target is not None
              else FixedKLController(p.kl_coef))

    state = {"step": 0, "episode": 0, "epoch": 0, "batch_in_epoch": 0, "train_time": 0.0, "tokens_seen": 0,
             "first_response_length": 0.0}
    if ckpt is not None:
        saved = load_trainer_state(ckpt)
        for obj, key in ((actor_opt, "actor_opt"), (critic_opt, "critic_opt"), (actor_sched, "actor_sched"),
                         (critic_sched, "critic_sched"), (kl_ctl, "kl_ctl")):
            obj.load_state_dict(saved[key])
        set_rng_state(saved["rng"])
        state.update(saved["state"])
    if is_main:
        a_train, a_total = count_parameters(unwrapped_actor)
        print(f"ppo: {report.kept} prompts ({report.dropped} dropped as longer than {d.max_length} tokens); "
              f"{n_steps} steps of {global_batch} episodes; actor trains {a_train:,} of {a_total:,} parameters "
              f"({cfg.memory_mode} mode); reward: {cfg.reward.model or cfg.reward.function}; "
              f"{world} process(es) on {device}", flush=True)
        if ckpt is not None:
            print(f"ppo: resumed from {ckpt} at step {state['step']} (kl_coef {kl_ctl.value:.4g})", flush=True)

    logger = MetricsLogger(run, is_main, state["step"] if ckpt is not None else None)
    checkpointer = Checkpointer(run, p.keep_checkpoints)
    samples_file = open(run.root / "samples.jsonl", "a", encoding="utf-8") if is_main else None

    def write_models(path: Path) -> None:
        save_model(unwrapped_actor, tokenizer, path / "actor")
        save_model(unwrapped_critic, tokenizer, path / "critic")

    batches = D.global_batches(len(prompts), global_batch, cfg.seed, start_epoch=state["epoch"])
    for _ in range(state["batch_in_epoch"]):
        next(batches)
    bar = progress(n_steps, state["step"], "ppo", is_main)
    guard = NonFiniteGuard(p.max_nonfinite_steps)
    stop_request = StopRequest().__enter__()
    warned: dict[str, bool] = {}
    last_eval: dict[str, float] = {}
    t_loop = time.time() - state["train_time"]
    while state["step"] < n_steps:
        t0 = time.time()
        epoch, index, indices = next(batches)
        batch_prompts = [prompts[i] for i in D.shard(indices, rank, world)]

        # ---- 1-2. rollout, truncated after the first EOS
        rollout = sample(unwrapped_actor, tokenizer, [q.ids for q in batch_prompts], p.response_length,
                         temperature=p.temperature)
        responses = decode_responses(tokenizer, rollout)
        mask = rollout.response_mask.float()  # (B, R)
        t_rollout = time.time() - t0

        # ---- 3. score without grad: reward, reference log-probs; old log-probs and values unless
        # the first update's forward covers the whole rollout (`ppo.fuse_scoring`): that forward runs
        # on the same weights, so its outputs are those numbers, and two forward passes are saved.
        B = rollout.response_ids.shape[0]
        fused = p.fuse_scoring and p.mini_batch_size >= B and p.micro_batch_size >= B
        with torch.no_grad():
            ref_logprobs = bundle.reference_logprobs(rollout, unwrapped_actor)  # (B, R)
            scores = bundle.reward.scores([q.text for q in batch_prompts], responses, rollout,
                                          [tokenizer.decode(q.ids, skip_special_tokens=True) for q in batch_prompts])  # (B,)
            if cfg.reward.missing_eos_penalty is not None:
                scores = torch.where(rollout.has_eos, scores, scores - cfg.reward.missing_eos_penalty)
            if cfg.reward.clip is not None:
                scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
            targets = None
            if not fused:
                logprobs, _ = bundle.policy_logprobs(actor, rollout)  # (B, R)
                values = bundle.values(critic, rollout) * mask  # (B, R)
                targets = rollout_targets(p, cfg.reward.whiten, kl_ctl.value, logprobs, ref_logprobs, values,
                                          scores, mask)

        # ---- 6. PPO updates: epochs x shuffled minibatches x micro-batches
        t1 = time.time()
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio", "ratio_var")}
        skipped = 0
        for _ in range(p.ppo_epochs):
            order = torch.randperm(B, device=device)
            for start in range(0, B, p.mini_batch_size):
                mb_idx = order[start:start + p.mini_batch_size]
                # Every micro-batch's token mean is weighted by its share of the minibatch's tokens,
                # so the update is the minibatch token mean whatever the accumulation or process count.
                mb_tokens = accelerator.reduce(mask[mb_idx].sum(), "sum")
                micro_starts = range(0, len(mb_idx), p.micro_batch_size)
                for j, ms in enumerate(micro_starts):
                    idx = mb_idx[ms:ms + p.micro_batch_size]
                    mb_mask = mask[idx]
                    with contextlib.ExitStack() as stack:
                        if j < len(micro_starts) - 1:  # sync gradients across processes only once
                            stack.enter_context(accelerator.no_sync(actor))
                            stack.enter_context(accelerator.no_sync(critic))
                        sub = rollout.select(idx)
                        new_logprobs, logits = bundle.policy_logprobs(actor, sub)
                        vpred = bundle.values(critic, sub)
                        if targets is None:  # fused: the first forward, on the rollout's weights
                            with torch.no_grad():
                                targets = rollout_targets(p, cfg.reward.whiten, kl_ctl.value,
                                                          unshuffle(new_logprobs, idx), ref_logprobs,
                                                          unshuffle(vpred, idx) * mask, scores, mask)
                        pg_loss, pg_stats = policy_loss(new_logprobs, targets["logprobs"][idx],
                                                        targets["advantages"][idx], mb_mask, p.clip_eps)
                        vf_loss, vf_stats = value_loss(vpred, targets["values"][idx], targets["returns"][idx],
                                                       mb_mask, p.value_clip_eps)
                        # Without an entropy bonus the entropy is only logged: no graph through a
                        # (B, R, V) softmax for a backward pass that would multiply it by 0.
                        with contextlib.nullcontext() if p.ent_coef else torch.no_grad():
                            entropy = masked_mean(entropy_from_logits(logits), mb_mask)
                        loss = pg_loss + p.vf_coef * vf_loss - p.ent_coef * entropy
                        accelerator.backward(loss * mb_mask.sum() * world / mb_tokens.clamp(min=1))
                    for k, v in (("approxkl", pg_stats["approxkl"]), ("clipfrac", pg_stats["clipfrac"]),
                                 ("pg_loss", pg_loss), ("vf_loss", vf_loss), ("vf_clipfrac", vf_stats["clipfrac"]),
                                 ("entropy", entropy), ("ratio", pg_stats["ratio"]), ("ratio_var", pg_stats["ratio_var"])):
                        stats[k].append(v.detach())
                actor_norm = accelerator.clip_grad_norm_(actor.parameters(), p.max_grad_norm)
                critic_norm = accelerator.clip_grad_norm_(critic.parameters(), p.max_grad_norm)
                # A non-finite loss or gradient: skip this update rather than poison the weights.
                if torch.isfinite(actor_norm) and torch.isfinite(critic_norm) and torch.isfinite(loss):
                    actor_opt.step()
                    critic_opt.step()
                else:
                    skipped += 1
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
        actor_sched.step()
        critic_sched.step()
        t_update = time.time() - t1
        if not guard.check(float("nan") if skipped else 0.0) and is_main:
            bar.write(f"ppo: step {state['step'] + 1}: {skipped} update(s) with a non-finite loss or gradient skipped "
                      f"({guard.in_a_row} step(s) in a row)")

        # ---- bookkeeping: KL controller, counters, metrics (named as TRL's, to compare curves)
        kl, logprobs, non_score_reward = targets["kl"], targets["logprobs"], targets["non_score_reward"]
        mean_kl = accelerator.reduce(kl.sum(1).mean(), "mean")
        beta = kl_ctl.value
        kl_ctl.update(mean_kl.item(), global_batch)
        state["step"] += 1
        state["episode"] += global_batch
        step_tokens = accelerator.reduce(rollout.attention_mask.sum(), "sum").item()
        state["tokens_seen"] += step_tokens
        state["epoch"], state["batch_in_epoch"] = ((epoch + 1, 0) if index + 1 == len(prompts) // global_batch
                                                   else (epoch, index + 1))
        bar.update(1)
        step_time = time.time() - t0
        if state["step"] % p.log_every == 0 or state["step"] == n_steps:
            mean = lambda x: accelerator.reduce(x.float().mean(), "mean").item()  # noqa: E731
            avg = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in stats.items()}
            metrics = {
                "objective/kl": mean_kl.item(),
                "objective/entropy": mean((-logprobs * mask).sum(1)),
                "objective/non_score_reward": mean(non_score_reward.sum(1)),
                "objective/rlhf_reward": mean(scores + non_score_reward.sum(1)),
                "objective/scores": mean(scores),
                "objective/kl_coef": beta,
                "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
                "policy/entropy_avg": avg["entropy"],
                "loss/policy_avg": avg["pg_loss"], "loss/value_avg": avg["vf_loss"],
                "val/clipfrac_avg": avg["vf_clipfrac"], "val/ratio": avg["ratio"], "val/ratio_var": avg["ratio_var"],
                "val/num_eos_tokens": accelerator.reduce(rollout.has_eos.sum(), "sum").item(),
                "response_length": mean(mask.sum(1)), "eos_rate": mean(rollout.has_eos),
                "lr": actor_sched.get_last_lr()[0], "episode": state["episode"],
                "episodes_per_sec": global_batch / step_time,
                "tokens_per_sec": step_tokens / step_time,
                "time/rollout": t_rollout, "time/update": t_update, "peak_memory_mb": peak_memory_mb(),
                "guard/nonfinite_steps": guard.total,
            }
            if not state["first_response_length"]:
                state["first_response_length"] = metrics["response_length"]
            flags = drift_warnings(metrics, state["first_response_length"], p)
            metrics.update({k: float(v) for k, v in flags.items()})
            for k, v in flags.items():
                if v and not warned.get(k) and is_main:
                    bar.write(f"ppo: warning at step {state['step']}: {k.split('/')[1].replace('_', ' ')} "
                              f"(kl {metrics['objective/kl']:.3g}, clipfrac {metrics['policy/clipfrac_avg']:.3g}, "
                              f"value loss {metrics['loss/value_avg']:.3g}, length {metrics['response_length']:.3g})")
                warned[k] = v
            logger.log(state["step"], metrics)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if is_main and (state["step"] % p.sample_every == 0 or state["step"] == 1):
            rows = [{"step": state["step"], "prompt": q.text, "response": r, "score": float(s)}
                    for q, r, s in list(zip(batch_prompts, responses, scores.tolist()))[:p.samples_logged]]
            for row in rows:
                samples_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.write(f"  [step {row['step']}] {row['prompt']!r} -> {row['response']!r}  score {row['score']:+.3f}")
            samples_file.flush()
        if eval_prompts and (state["step"] % p.eval_every == 0 or state["step"] == n_steps):
            if is_main:
                last_eval = evaluate(bundle, unwrapped_actor, tokenizer, eval_prompts, cfg, gold)
                logger.log(state["step"], last_eval)
            accelerator.wait_for_everyone()
        state["train_time"] = time.time() - t_loop
        stopping = stop_request.should_stop(accelerator) and state["step"] < n_steps
        if (state["step"] % p.save_every == 0 and state["step"] < n_steps) or stopping:
            if is_main:
                checkpointer.save(state["step"], write_models, {
                    "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                    "actor_sched": actor_sched.state_dict(), "critic_sched": critic_sched.state_dict(),
                    "kl_ctl": kl_ctl.state_dict(), "rng": rng_state(), "state": state})
            accelerator.wait_for_everyone()
        if stopping:
            bar.close()
            stop_request.__exit__()
            raise Stopped(f"ppo: stopped at step {state['step']} of {n_steps}; checkpoint saved in "
                          f"{run.checkpoints}, continue with --resume")
    bar.close()
    stop_request.__exit__()

    # ---- the final actor, then the summary that marks the run complete
    if is_main:
        finish_model(run, lambda path: save_model(unwrapped_actor, tokenizer, path, merge_lora=cfg.lora.merge))
        samples_file.close()
    accelerator.wait_for_everyone()
    summary = {"stage": "ppo", "steps": state["step"], "episodes": state["episode"], "tokens_seen": state["tokens_seen"],
               "wall_time_sec": time.time() - t_start, "train_time_sec": state["train_time"],
               "peak_memory_mb": peak_memory_mb(), "kl_coef": kl_ctl.value, "memory_mode": cfg.memory_mode,
               **last_eval}
    if is_main:
        write_summary(run, summary)
    logger.close()
    return summary
