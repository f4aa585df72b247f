"""The PPO loop, generalised: the one online-RL loop of `align ppo`, `grpo`, `dr_grpo`, `rloo`,
`reinforce_pp` and `remax`.

Every method samples a group of `ppo.n_samples_per_prompt` responses per prompt, scores them with
the same reward path (align/reward.py), and updates the policy with PPO's clipped-ratio loss; what
differs is the advantage estimator (align/rl.py's registry) and where the KL goes (verl and
OpenRLHF are built the same way). One step, top to bottom (DESIGN.md; CleanRL's loop; Huang et
al. 2024, "The N+ Implementation Details of RLHF with PPO"):

1. rollout: the policy samples n responses per prompt (KV cache, batched, left padding) through the
   rollout engine (`rollout.engine`, align/rollout.py: HF generate, or vLLM fed the weights after
   every update), truncated after the first EOS; with dynamic sampling (DAPO) groups whose rewards all match are dropped and
   more prompts sampled; ReMax also decodes each prompt greedily for its baseline;
2. score without grad: training scores (raw reward, missing-EOS and overlong penalties, clip), the
   reference log-probs, and (unless the first update's forward covers the rollout) the old
   log-probs and the critic's values;
3. advantages: the estimator's, from the scores, the per-token KL when it is in the reward, the
   values (gae); optionally whitened;
4. ppo_epochs x shuffled minibatches x micro-batches: clipped policy loss (clip-higher, dual clip),
   plus kl_coef x KL when it is in the loss, reduced by `ppo.loss_agg`; plus vf_coef x the clipped
   value loss (gae); minus ent_coef x entropy;
5. log (TRL's metric names), evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from align import data as D
from align import sharding
from align.bundle import ModelBundle, ValueHead, build_bundle, check_models, rl_plan
from align.checkpoint import Checkpointer, resume_point
from align.config import RLConfig
from align.errors import AlignError
from align.generation import Rollout, cat_rollouts, decode_responses
from align.modeling import context_length, count_parameters, load_tokenizer, save_model
from align.ops import entropy_from_logits, masked_mean, masked_whiten
from align.reward import call_reward_function, load_reward_function
from align.rl import (AdaptiveKLController, AdvantageInput, FixedKLController, agg_loss, clipped_policy_loss,
                      get_estimator, kl_estimate, logprob_diff_stats, rollout_correction, value_loss,
                      zero_variance_groups)
from align.rollout import RolloutEngine, engine_settings, get_engine
from align.rundir import finish_model, prepare_run_dir, write_summary
from align.runtime import (MetricsLogger, NonFiniteGuard, StopRequest, Stopped, check_scheduler, make_accelerator,
                           make_optimizer, make_scheduler, peak_memory_mb, progress, set_seed)


@dataclass
class Experience:
    """A scored rollout: everything the updates read, one row per response (B rows, prompt-major
    groups: rows [k*n, (k+1)*n) answer prompt k). R is the padded response width."""

    rollout: Rollout
    prompts: list[D.Prompt]          # (B,) the prompt of each row
    responses: list[str]             # (B,) decoded response texts
    raw_scores: torch.Tensor         # (B,) the reward's own scores
    scores: torch.Tensor             # (B,) training scores (align/reward.py `shape_scores`)
    ref_logprobs: torch.Tensor       # (B, R) under the frozen reference
    logprobs: torch.Tensor | None = None    # (B, R) old log-probs (None until the fused forward)
    values: torch.Tensor | None = None      # (B, R) critic values, 0 on padding (gae only)
    kl: torch.Tensor | None = None          # (B, R) per-token KL estimate of the old policy, 0 on padding
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None     # (B, R) value targets (gae)
    is_weights: torch.Tensor | None = None  # (B, R) `rollout.correction`: trainer/sampler weight per token
    dropped_groups: int = 0                 # dynamic sampling: zero-variance groups dropped
    topped_up_groups: int = 0               # ... and put back because the rounds ran out

    @property
    def mask(self) -> torch.Tensor:  # (B, R) float
        return self.rollout.response_mask.float()


def advantages(exp: Experience, cfg: RLConfig, beta: float, baseline: torch.Tensor | None) -> None:
    """Step 3: the per-token KL of the old policy, then the estimator's advantages (and returns),
    optionally whitened over the batch's response tokens; with `rollout.correction`, the importance
    weight of each token against the sampler (rl.rollout_correction). Fills `exp.kl/advantages/returns`
    (and `exp.is_weights`)."""
    p, mask = cfg.ppo, exp.mask
    if cfg.rollout.correction:
        exp.is_weights = rollout_correction(exp.logprobs, exp.rollout.sampler_logprobs, mask, cfg.rollout.correction,
                                            cfg.rollout.correction_cap)
    exp.kl = kl_estimate(exp.logprobs, exp.ref_logprobs, p.kl_kind) * mask
    in_reward = not p.kl_in_loss
    inp = AdvantageInput(exp.scores, mask, p.n_samples_per_prompt, kl=exp.kl if in_reward else None,
                         kl_coef=beta if in_reward else 0.0, values=exp.values, baseline_scores=baseline,
                         gamma=p.gamma, lam=p.lam, whiten_rewards=cfg.reward.whiten)
    exp.advantages, exp.returns = get_estimator(p.estimator).fn(inp)
    if p.whiten:
        exp.advantages = masked_whiten(exp.advantages, mask)


def step_metrics(exp: Experience, stats: dict[str, float], cfg: RLConfig, beta: float, reduce: Callable) -> dict:
    """The step's metrics, named as TRL named them (so curves compare); `reduce(x)` is the mean over
    processes, `stats` the update's averaged statistics."""
    mask, in_reward = exp.mask, not cfg.ppo.kl_in_loss
    non_score = -beta * exp.kl if in_reward else torch.zeros_like(exp.kl)  # (B, R), 0 on padding
    out = {
        "objective/kl": reduce(exp.kl.sum(1).mean()),
        "objective/entropy": reduce((-exp.logprobs * mask).sum(1).mean()),
        "objective/non_score_reward": reduce(non_score.sum(1).mean()),
        "objective/rlhf_reward": reduce((exp.scores + non_score.sum(1)).mean()),
        "objective/scores": reduce(exp.scores.mean()),
        "objective/raw_scores": reduce(exp.raw_scores.float().mean()),
        "objective/kl_coef": beta,
        "policy/approxkl_avg": stats["approxkl"], "policy/clipfrac_avg": stats["clipfrac"],
        "policy/entropy_avg": stats["entropy"], "policy/advantages_mean": reduce(masked_mean(exp.advantages, mask)),
        "loss/policy_avg": stats["pg_loss"], "loss/value_avg": stats.get("vf_loss", 0.0),
        "val/clipfrac_avg": stats.get("vf_clipfrac", 0.0), "val/ratio": stats["ratio"],
        "val/ratio_var": stats["ratio_var"],
        "response_length": reduce(mask.sum(1).mean()), "eos_rate": reduce(exp.rollout.has_eos.float().mean()),
    }
    if cfg.ppo.dynamic_sampling:
        out.update({"rollout/dropped_groups": exp.dropped_groups, "rollout/topped_up_groups": exp.topped_up_groups})
    if exp.rollout.sampler_logprobs is not None:  # the sampler/trainer gap (one process: the engine runs in one)
        gap = logprob_diff_stats(exp.logprobs, exp.rollout.sampler_logprobs, mask)
        out.update({f"rollout/{k}": v.item() for k, v in gap.items()})
    if exp.is_weights is not None:
        out["rollout/correction_weight_mean"] = masked_mean(exp.is_weights, mask).item()
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


@torch.no_grad()
def evaluate(bundle: ModelBundle, engine: RolloutEngine, tokenizer: Any, prompts: list[D.Prompt], cfg: RLConfig,
             gold: Any) -> dict[str, float]:
    """Greedy responses on the held-out prompts, scored by the learned reward (raw) and the gold one."""
    p = cfg.ppo
    scores, golds, lengths, eos = [], [], [], []
    for s in range(0, len(prompts), p.rollout_batch_size):
        chunk = prompts[s:s + p.rollout_batch_size]
        rollout = engine.generate([q.ids for q in chunk], p.response_length, greedy=True)
        texts = decode_responses(tokenizer, rollout)
        raw = [q.text for q in chunk]
        scores.append(bundle.reward.scores(raw, texts, rollout, [tokenizer.decode(q.ids, skip_special_tokens=True)
                                                                 for q in chunk]).cpu())
        if gold is not None:
            golds.append(call_reward_function(gold, cfg.eval.gold_reward, raw, texts))
        lengths.append(rollout.response_mask.sum(1).float().cpu())
        eos.append(rollout.has_eos.float().cpu())
    out = {"eval/reward": torch.cat(scores).mean().item(), "eval/response_length": torch.cat(lengths).mean().item(),
           "eval/eos_rate": torch.cat(eos).mean().item()}
    if golds:
        out["eval/gold_reward"] = torch.cat(golds).mean().item()
    return out


def check_inputs(cfg: RLConfig, ready: Callable[..., bool]) -> None:
    """What `align run --dry-run` can check of an RL stage while an earlier stage is pending."""
    d = cfg.data
    for source, split, columns in ((d.train, d.split, {"dataset_config": d.dataset_config, "columns": d.columns}),
                                   (cfg.eval.prompts, "train", {})):
        if source and ready(source):
            D.read_prompt_records(source, cfg.data.format, split, **columns)
    for key, spec in (("reward.function", cfg.reward.function), ("eval.gold_reward", cfg.eval.gold_reward)):
        if spec:
            load_reward_function(spec, key)


def unshuffle(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in shuffled `order` (a permutation of all rows), detached, back in rollout order."""
    out = torch.empty_like(x, requires_grad=False)
    out[order] = x.detach()
    return out


@dataclass
class Trainees:
    """What the loop trains, prepared by accelerate: the actor, and for gae the critic (a separate
    model) or a value head on the actor (`critic.share_actor`); each with its AdamW and schedule."""

    actor: Any
    actor_opt: Any
    actor_sched: Any
    critic: Any = None
    head: Any = None
    critic_opt: Any = None
    critic_sched: Any = None

    @property
    def models(self) -> list[Any]:
        return [m for m in (self.actor, self.critic, self.head) if m is not None]


def prepare_trainees(cfg: RLConfig, bundle: ModelBundle, accelerator: Any, n_steps: int) -> Trainees:
    p = cfg.ppo
    sharding.configure_deepspeed(accelerator, p.micro_batch_size, p.max_grad_norm)
    actor_opt = make_optimizer(bundle.actor.parameters(), p.lr, p.weight_decay, p.adam_betas)
    critic_model = bundle.critic if bundle.critic is not None else (
        ValueHead(bundle.actor.config.hidden_size).to(accelerator.device) if cfg.critic.share_actor else None)
    if critic_model is None:
        actor, actor_opt = accelerator.prepare(bundle.actor, actor_opt)
        return Trainees(actor, actor_opt, make_scheduler(actor_opt, p, n_steps))
    critic_opt = make_optimizer(critic_model.parameters(), cfg.critic.lr, p.weight_decay, p.adam_betas)
    actor_sched, critic_sched = make_scheduler(actor_opt, p, n_steps), make_scheduler(critic_opt, p, n_steps)
    # One model with its optimizer per call: accelerate's FSDP2 prepares one model at a time.
    actor, actor_opt = accelerator.prepare(bundle.actor, actor_opt)
    critic, critic_opt = accelerator.prepare(critic_model, critic_opt)
    if cfg.critic.share_actor:
        return Trainees(actor, actor_opt, actor_sched, head=critic, critic_opt=critic_opt, critic_sched=critic_sched)
    return Trainees(actor, actor_opt, actor_sched, critic=critic, critic_opt=critic_opt, critic_sched=critic_sched)


class Sampler:
    """Steps 1-2: this process's prompts, sampled and scored. Its position in the prompt order lives
    in the loop's `state` (epoch, batch in epoch), so a resumed run draws the same prompts."""

    def __init__(self, cfg: RLConfig, bundle: ModelBundle, actor: Any, engine: RolloutEngine, tokenizer: Any,
                 prompts: list[D.Prompt], state: dict[str, Any], rank: int, world: int):
        self.cfg, self.bundle, self.actor, self.engine, self.tokenizer, self.prompts, self.state = (
            cfg, bundle, actor, engine, tokenizer, prompts, state)
        self.n, self.rank, self.world = cfg.ppo.n_samples_per_prompt, rank, world
        self.per_step = cfg.ppo.rollout_batch_size // self.n * world  # prompts per step, all processes
        self.batches = D.global_batches(len(prompts), self.per_step, cfg.seed, start_epoch=state["epoch"])
        for _ in range(state["batch_in_epoch"]):
            next(self.batches)

    def next_prompts(self) -> list[D.Prompt]:
        """This process's share of the next global batch of prompts, each repeated n times (prompt-major)."""
        epoch, index, indices = next(self.batches)
        last = index + 1 == len(self.prompts) // self.per_step
        self.state["epoch"], self.state["batch_in_epoch"] = (epoch + 1, 0) if last else (epoch, index + 1)
        return [self.prompts[i] for i in D.shard(indices, self.rank, self.world) for _ in range(self.n)]

    def score(self, rows: list[D.Prompt], rollout: Rollout) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Response texts, raw and training scores (align/reward.py: one path for every method)."""
        texts = decode_responses(self.tokenizer, rollout)
        raw, shaped = self.bundle.reward.training_scores(
            [q.text for q in rows], texts, rollout, [self.tokenizer.decode(q.ids, skip_special_tokens=True) for q in rows])
        return texts, raw, shaped

    def collect(self) -> Experience:
        """One generate call; with dynamic sampling (DAPO), as many as it takes (at most
        `ppo.max_sampling_rounds`) to fill the batch with groups whose training scores differ."""
        p, n = self.cfg.ppo, self.n
        kept: list[tuple[list[D.Prompt], Rollout, list[str], torch.Tensor, torch.Tensor]] = []
        spare, dropped, rows_kept = [], 0, 0
        for _ in range(p.max_sampling_rounds if p.dynamic_sampling else 1):
            rows = self.next_prompts()
            rollout = self.engine.generate([q.ids for q in rows], p.response_length, temperature=p.temperature)
            texts, raw, shaped = self.score(rows, rollout)
            if not p.dynamic_sampling:
                return Experience(rollout, rows, texts, raw, shaped, self.bundle.reference_logprobs(rollout, self.actor))
            flat = zero_variance_groups(shaped, n)  # (G,)
            dropped += int(flat.sum())
            for g in range(len(flat)):
                rows_g = torch.arange(g * n, (g + 1) * n, device=rollout.response_ids.device)
                part = (rows[g * n:(g + 1) * n], rollout.select(rows_g), texts[g * n:(g + 1) * n],
                        raw[g * n:(g + 1) * n], shaped[g * n:(g + 1) * n])
                (spare if flat[g] else kept).append(part)
            rows_kept = min(len(kept) * n, p.rollout_batch_size)
            if rows_kept == p.rollout_batch_size:
                break
        topped_up = max(0, (p.rollout_batch_size - rows_kept) // n)
        parts = (kept + spare[:topped_up])[:p.rollout_batch_size // n]
        rollout = cat_rollouts([r for _, r, *_ in parts], self.tokenizer.pad_token_id)
        exp = Experience(rollout, [q for rows, *_ in parts for q in rows], [t for _, _, ts, *_ in parts for t in ts],
                         torch.cat([r for *_, r, _ in parts]), torch.cat([s for *_, s in parts]),
                         self.bundle.reference_logprobs(rollout, self.actor))
        exp.dropped_groups, exp.topped_up_groups = dropped, topped_up
        return exp

    def greedy_baseline(self, exp: Experience) -> torch.Tensor:
        """ReMax: the training score of each row's prompt answered greedily (one decode per prompt)."""
        firsts = exp.prompts[::self.n]
        rollout = self.engine.generate([q.ids for q in firsts], self.cfg.ppo.response_length, greedy=True)
        return self.score(firsts, rollout)[2].repeat_interleave(self.n)


def forward(bundle: ModelBundle, t: Trainees, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(B, R) log-probs, (B, R, V) logits and (B, R) values (None without a critic) of a rollout."""
    if t.head is not None:
        return bundle.policy_logprobs_and_values(t.actor, t.head, rollout)
    logprobs, logits = bundle.policy_logprobs(t.actor, rollout)
    return logprobs, logits, bundle.values(t.critic, rollout) if t.critic is not None else None


def update(exp: Experience, cfg: RLConfig, bundle: ModelBundle, t: Trainees, accelerator: Any, beta: float,
           baseline: torch.Tensor | None, train_actor: bool) -> tuple[dict[str, list[torch.Tensor]], int]:
    """Step 4: ppo_epochs x shuffled minibatches x micro-batches. Returns the per-micro-batch stats
    and the number of updates skipped for a non-finite loss or gradient. When the old log-probs are
    missing (fused scoring), the first forward provides them and step 3 runs there."""
    p, world, device = cfg.ppo, accelerator.num_processes, accelerator.device
    mask, B = exp.mask, exp.rollout.response_ids.shape[0]
    sums: dict[str, list[torch.Tensor]] = {}
    skipped = 0
    for _ in range(p.ppo_epochs):
        order = torch.randperm(B, device=device)
        for start in range(0, B, p.mini_batch_size):
            mb_idx = order[start:start + p.mini_batch_size]
            # Every micro-batch's loss is its share of the whole minibatch's (tokens or responses of
            # every process), so the update is the same whatever the split (rl.agg_loss).
            mb_tokens = accelerator.reduce(mask[mb_idx].sum(), "sum")
            mb_seqs = accelerator.reduce(torch.tensor(float(len(mb_idx)), device=device), "sum")
            micro_starts = range(0, len(mb_idx), p.micro_batch_size)
            for j, ms in enumerate(micro_starts):
                idx = mb_idx[ms:ms + p.micro_batch_size]
                mb_mask = mask[idx]
                # Gradients are synchronised (and a DeepSpeed engine steps) at the last micro-batch only.
                with sharding.accumulating(accelerator, t.models, accumulate=j < len(micro_starts) - 1):
                    new_logprobs, logits, vpred = forward(bundle, t, exp.rollout.select(idx))
                    if exp.advantages is None:  # fused: the first forward, on the rollout's weights
                        with torch.no_grad():
                            exp.logprobs = unshuffle(new_logprobs, idx)
                            if vpred is not None:
                                exp.values = unshuffle(vpred, idx) * mask
                            advantages(exp, cfg, beta, baseline)
                    pg_mat, pg_stats = clipped_policy_loss(new_logprobs, exp.logprobs[idx], exp.advantages[idx],
                                                           mb_mask, p.clip_eps, p.clip_eps_high, p.clip_c)
                    if exp.is_weights is not None:  # TIS / MIS: the samples came from the engine's policy
                        pg_mat = pg_mat * exp.is_weights[idx]
                    if p.kl_in_loss:  # GRPO: beta x KL(policy || reference) per token, in the loss
                        pg_mat = pg_mat + beta * kl_estimate(new_logprobs, exp.ref_logprobs[idx], p.kl_kind) * mb_mask
                    # Without an entropy bonus the entropy is only logged: no graph through a
                    # (B, R, V) softmax for a backward pass that would multiply it by 0.
                    with contextlib.nullcontext() if p.ent_coef else torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits), mb_mask)
                    token_share = mb_mask.sum() * world / mb_tokens.clamp(min=1)
                    step_stats = {"entropy": entropy, **pg_stats}
                    if p.loss_agg == "token-mean":  # one scale for every term, as PPO has always summed them
                        pg_loss = masked_mean(pg_mat, mb_mask)
                        actor_loss = (pg_loss - p.ent_coef * entropy) * token_share
                    else:  # the micro-batch's part of the minibatch's loss, x world (DDP averages)
                        pg_loss = agg_loss(pg_mat, mb_mask, p.loss_agg, max_len=p.response_length)
                        actor_loss = agg_loss(pg_mat, mb_mask, p.loss_agg, global_tokens=mb_tokens,
                                              global_seqs=mb_seqs, max_len=p.response_length) * world \
                            - p.ent_coef * entropy * token_share
                    parts = [(t.actor, actor_loss)]
                    if vpred is not None:
                        vf_loss, vf_stats = value_loss(vpred, exp.values[idx], exp.returns[idx], mb_mask,
                                                       p.value_clip_eps)
                        # A separate critic's parameters reach the value loss alone, so under DeepSpeed
                        # each part steps its own engine (sharding.backward); a value head on the actor
                        # reaches the actor's trunk too, which is why sharding refuses it.
                        parts.append((t.critic if t.critic is not None else t.head, p.vf_coef * vf_loss * token_share))
                        step_stats.update(vf_loss=vf_loss, vf_clipfrac=vf_stats["clipfrac"])
                    loss = sharding.backward(accelerator, parts, frozen=() if train_actor else (t.actor,))
                    step_stats["pg_loss"] = pg_loss
                for k, v in step_stats.items():
                    sums.setdefault(k, []).append(v.detach())
            norms = [sharding.clip_grad_norm(accelerator, m, p.max_grad_norm) for m in t.models]
            # A non-finite loss or gradient: skip this update rather than poison the weights.
            if all(torch.isfinite(x) for x in norms) and torch.isfinite(loss):
                if train_actor:  # `critic.warmup_steps`: only the critic learns at first
                    t.actor_opt.step()
                if t.critic_opt is not None:
                    t.critic_opt.step()
            else:
                skipped += 1
            for opt in (t.actor_opt, t.critic_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
    return sums, skipped


def train_ppo(cfg: RLConfig, resume: bool = False, force: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Train any online method (`cfg.ppo.estimator`) and return the summary; with `dry_run`, check
    every input and return the plan instead (nothing is loaded but configs and tokenizers, nothing
    is written)."""
    t_start = time.time()
    p, est = cfg.ppo, get_estimator(cfg.ppo.estimator)
    stage, n = p.estimator if p.estimator != "gae" else "ppo", p.n_samples_per_prompt
    accelerator = make_accelerator(p.mixed_precision, p.report_to, cfg.output_dir, key="ppo.report_to")
    critic_kind = None if not est.needs_critic else "shared" if cfg.critic.share_actor else "separate"
    sharding.check_supported(accelerator, critic=critic_kind)
    is_main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    set_seed(cfg.seed)
    run = prepare_run_dir(cfg.output_dir, cfg, resume, is_main, force, dry_run)

    # ---- every input checked before any weight is loaded: models, prompts, eval prompts, rewards
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path,
                               key="model.tokenizer" if cfg.model.tokenizer else "model.path")
    found = check_models(cfg, tokenizer)
    if found["text_bridge"] and is_main:
        print(f"{stage}: note: the reward model's tokenizer differs from the actor's; responses are decoded and "
              "re-tokenized for it (text bridge)", flush=True)
    d = cfg.data
    context = context_length(*(found[k] for k in ("actor", "critic", "reward") if k in found))
    prompts, report = D.load_prompts(d.train, d.format, d.prompt_template, tokenizer, d.max_length, d.truncation,
                                     d.split, d.max_samples, context, p.response_length, d.dataset_config, d.columns)
    eval_prompts = D.load_prompts(cfg.eval.prompts, d.format, d.prompt_template, tokenizer, d.max_length,
                                  d.truncation, max_samples=cfg.eval.max_samples, context=context,
                                  new_tokens=p.response_length)[0] if cfg.eval.prompts else []
    gold = load_reward_function(cfg.eval.gold_reward, "eval.gold_reward") if cfg.eval.gold_reward else None
    global_batch, prompts_per_step = p.rollout_batch_size * world, p.rollout_batch_size // n * world
    n_steps = p.total_episodes // global_batch
    if len(prompts) < prompts_per_step or n_steps < 1:
        raise AlignError(f"{len(prompts)} prompts and ppo.total_episodes {p.total_episodes} make no rollout batch of "
                         f"{prompts_per_step} prompts x {n} responses (ppo.rollout_batch_size x {world} "
                         "process(es)); lower ppo.rollout_batch_size")
    check_scheduler(p, n_steps, "ppo", (p.lr, cfg.critic.lr) if est.needs_critic or cfg.critic.share_actor else ())
    engine_spec = get_engine(cfg.rollout.engine)
    settings = engine_settings(cfg, found["actor"], tokenizer, max(len(q.ids) for q in prompts + eval_prompts), world)
    engine_spec.check(settings)
    if dry_run:
        return rl_plan(cfg, stage, found, f"{report.kept} prompts ({report.dropped} dropped as longer than "
                       f"{d.max_length} tokens); {len(eval_prompts)} eval prompts", n_steps, global_batch)

    # ---- the models, their optimizers, the KL controller; restored when resuming
    ckpt = resume_point(run) if resume else None
    bundle = build_bundle(cfg, tokenizer, device, ckpt)
    t = prepare_trainees(cfg, bundle, accelerator, n_steps)
    actor = accelerator.unwrap_model(t.actor)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target is not None
              else FixedKLController(p.kl_coef))
    models = {"actor": (actor, tokenizer)}
    stateful: dict[str, Any] = {"actor_opt": t.actor_opt, "actor_sched": t.actor_sched, "kl_ctl": kl_ctl}
    prepared, optimizers = {"actor": t.actor}, {"actor_opt": (t.actor, t.actor_opt)}
    if t.critic is not None:
        models["critic"] = (accelerator.unwrap_model(t.critic), tokenizer)
        prepared["critic"] = t.critic
        optimizers["critic_opt"] = (t.critic, t.critic_opt)
    if t.head is not None:
        stateful["value_head"] = accelerator.unwrap_model(t.head)
    if t.critic_opt is not None:
        stateful.update(critic_opt=t.critic_opt, critic_sched=t.critic_sched)
    checkpointer = Checkpointer(run, p.keep_checkpoints, accelerator, models, stateful, prepared, optimizers)
    state = {"step": 0, "episode": 0, "epoch": 0, "batch_in_epoch": 0, "train_time": 0.0, "tokens_seen": 0,
             "tokens_generated": 0, "first_response_length": 0.0}
    if ckpt is not None:
        state.update(checkpointer.restore(ckpt))
    if is_main:
        a_train, a_total = count_parameters(actor)
        critic = "a value head on the actor" if t.head is not None else "a critic" if est.needs_critic else "no critic"
        print(f"{stage}: {report.kept} prompts ({report.dropped} dropped as longer than {d.max_length} tokens); "
              f"{n_steps} steps of {prompts_per_step} prompts x {n} responses; estimator {p.estimator}, KL "
              f"{p.kl_kind} in the {'loss' if p.kl_in_loss else 'reward'}; policy trains {a_train:,} of "
              f"{a_total:,} parameters ({cfg.memory_mode} mode); {critic}; "
              f"reward: {cfg.reward.model or cfg.reward.function}; {world} process(es) on {device}", flush=True)
        if ckpt is not None:
            print(f"{stage}: resumed from {ckpt} at step {state['step']} (kl_coef {kl_ctl.value:.4g})", flush=True)

    # Started once, on the (restored) actor's weights; the HF engine samples through the launch's
    # sharding (align/sharding.py), vLLM runs in one process only.
    engine = engine_spec.build(settings, actor, tokenizer, accelerator)
    logger = MetricsLogger(run, is_main, state["step"] if ckpt is not None else None, accelerator, cfg)
    samples_file = open(run.root / "samples.jsonl", "a", encoding="utf-8") if is_main else None
    sampler = Sampler(cfg, bundle, actor, engine, tokenizer, prompts, state, accelerator.process_index, world)
    # A sharded actor's forward is collective: every process decodes the eval prompts with it.
    evaluating = is_main or sharding.strategy(accelerator) is not None

    def eval_log() -> dict[str, float]:
        """Greedy eval, logged with the compute spent so far (curves at matched compute)."""
        out: dict[str, float] = {}
        if evaluating:
            out = evaluate(bundle, engine, tokenizer, eval_prompts, cfg, gold)
            out.update(episode=state["episode"], tokens_seen=state["tokens_seen"],
                       tokens_generated=state["tokens_generated"], train_time=time.time() - t_loop)
            logger.log(state["step"], out)
        accelerator.wait_for_everyone()
        return out

    bar = progress(n_steps, state["step"], stage, is_main)
    guard = NonFiniteGuard(p.max_nonfinite_steps)
    stop_request = StopRequest().__enter__()
    warned: dict[str, bool] = {}
    last_eval: dict[str, float] = {}
    t_loop = time.time() - state["train_time"]
    if eval_prompts and state["step"] == 0:  # the curves start at the SFT point
        last_eval = eval_log()
    while state["step"] < n_steps:
        t0 = time.time()
        # ---- 1-3. rollout, scores, advantages: old log-probs and values unless the first update's
        # forward covers the whole rollout (`ppo.fuse_scoring`): it runs on the same weights, so its
        # outputs are those numbers, and two forward passes are saved.
        with torch.no_grad():
            exp = sampler.collect()
            baseline = sampler.greedy_baseline(exp) if est.needs_greedy_baseline else None
            B = exp.rollout.response_ids.shape[0]
            if not (p.fuse_scoring and p.mini_batch_size >= B and p.micro_batch_size >= B):
                exp.logprobs, _, values = forward(bundle, t, exp.rollout)  # (B, R)
                exp.values = values * exp.mask if values is not None else None
                advantages(exp, cfg, kl_ctl.value, baseline)
        t_rollout = time.time() - t0

        # ---- 4. updates, then the new weights into the rollout engine (nothing to do for hf)
        engine.sleep()
        t1 = time.time()
        sums, skipped = update(exp, cfg, bundle, t, accelerator, kl_ctl.value, baseline,
                               train_actor=state["step"] >= cfg.critic.warmup_steps)
        for sched in (t.actor_sched, t.critic_sched):
            if sched is not None:
                sched.step()
        t_update = time.time() - t1
        engine.load_weights(actor)
        t_sync = time.time() - t1 - t_update
        if not guard.check(float("nan") if skipped else 0.0) and is_main:
            bar.write(f"{stage}: step {state['step'] + 1}: {skipped} update(s) with a non-finite loss or gradient "
                      f"skipped ({guard.in_a_row} step(s) in a row)")

        # ---- 5. bookkeeping: KL controller, counters, metrics, samples, eval, checkpoint
        mean_kl = accelerator.reduce(exp.kl.sum(1).mean(), "mean")
        beta = kl_ctl.value
        kl_ctl.update(mean_kl.item(), global_batch)
        state["step"] += 1
        state["episode"] += global_batch
        step_tokens = accelerator.reduce(exp.rollout.attention_mask.sum(), "sum").item()
        state["tokens_seen"] += step_tokens
        # Response tokens of the responses trained on (dynamic sampling's dropped draws not counted).
        state["tokens_generated"] += accelerator.reduce(exp.rollout.response_mask.sum(), "sum").item()
        bar.update(1)
        step_time = time.time() - t0
        if state["step"] % p.log_every == 0 or state["step"] == n_steps:
            reduce = lambda x: accelerator.reduce(x.float(), "mean").item()  # noqa: E731
            stats = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in sums.items()}
            metrics = step_metrics(exp, stats, cfg, beta, reduce)
            metrics.update({
                "val/num_eos_tokens": accelerator.reduce(exp.rollout.has_eos.sum(), "sum").item(),
                "lr": t.actor_sched.get_last_lr()[0], "episode": state["episode"], "tokens_seen": state["tokens_seen"],
                "episodes_per_sec": global_batch / step_time, "tokens_per_sec": step_tokens / step_time,
                "time/rollout": t_rollout, "time/update": t_update, "time/weight_sync": t_sync,
                "peak_memory_mb": peak_memory_mb(),
                "guard/nonfinite_steps": guard.total})
            state["first_response_length"] = state["first_response_length"] or metrics["response_length"]
            flags = drift_warnings(metrics, state["first_response_length"], p)
            metrics.update({k: float(v) for k, v in flags.items()})
            for k, v in flags.items():
                if v and not warned.get(k) and is_main:
                    bar.write(f"{stage}: warning at step {state['step']}: {k.split('/')[1].replace('_', ' ')} "
                              f"(kl {metrics['objective/kl']:.3g}, clipfrac {metrics['policy/clipfrac_avg']:.3g}, "
                              f"value loss {metrics['loss/value_avg']:.3g}, length {metrics['response_length']:.3g})")
                warned[k] = v
            logger.log(state["step"], metrics)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if is_main and (state["step"] % p.sample_every == 0 or state["step"] == 1):
            for q, r, s in list(zip(exp.prompts, exp.responses, exp.scores.tolist()))[:p.samples_logged]:
                samples_file.write(json.dumps({"step": state["step"], "prompt": q.text, "response": r, "score": s},
                                              ensure_ascii=False) + "\n")
                bar.write(f"  [step {state['step']}] {q.text!r} -> {r!r}  score {s:+.3f}")
            samples_file.flush()
        if eval_prompts and (state["step"] % p.eval_every == 0 or state["step"] == n_steps):
            last_eval = eval_log()
        state["train_time"] = time.time() - t_loop
        stopping = stop_request.should_stop(accelerator) and state["step"] < n_steps
        if (state["step"] % p.save_every == 0 and state["step"] < n_steps) or stopping:
            checkpointer.save(state["step"], state)
        if stopping:
            bar.close()
            stop_request.__exit__()
            engine.close()
            raise Stopped(f"{stage}: stopped at step {state['step']} of {n_steps}; checkpoint saved in "
                          f"{run.checkpoints}, continue with --resume")
    bar.close()
    stop_request.__exit__()
    engine.close()

    # ---- the final policy, then the summary that marks the run complete
    full = sharding.full_state_dicts(accelerator, {"actor": t.actor})["actor"]
    if is_main:
        finish_model(run, lambda path: save_model(actor, tokenizer, path, merge_lora=cfg.lora.merge, state_dict=full))
        samples_file.close()
    accelerator.wait_for_everyone()
    summary = {"stage": stage, "estimator": p.estimator, "steps": state["step"], "episodes": state["episode"],
               "tokens_seen": state["tokens_seen"], "wall_time_sec": time.time() - t_start,
               "train_time_sec": state["train_time"], "peak_memory_mb": peak_memory_mb(), "kl_coef": kl_ctl.value,
               "memory_mode": cfg.memory_mode, **{k: v for k, v in last_eval.items() if k.startswith("eval/")}}
    if is_main:
        write_summary(run, summary)
    logger.close()
    return summary
