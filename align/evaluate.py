"""`align eval`: the same held-out prompts through several checkpoints, with the same metrics.

For each model:
- greedy responses to every prompt, scored by the learned reward and the gold reward (if any);
- KL to the reference policy, estimated on one sample per prompt y ~ pi:
  KL = mean_prompts sum_t [log pi(y_t | ...) - log pi_ref(y_t | ...)] (k1, unbiased; Schulman's
  note), both distributions at `kl_temperature`;
- perplexity and token accuracy on the SFT validation set (response tokens only);
- mean response length (tokens, EOS included) and EOS rate;
- the compute that produced it: wall time, tokens and episodes, peak memory, summed along the
  chain of runs that led to it (SFT, then SFT+PPO, ...).
Writes `results.json` and `responses/<name>.jsonl` (per prompt: response, reward, gold) into
`output_dir`; `align compare` builds the report from them. With `best_of: n`, a best-of-n row;
with `best_of_curve`, best-of-n for several n from one draw (results.json `best_of_curves`, the
candidates in `responses/<name>.best-of-curve.jsonl`), which the multi-seed report plots.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from align import data as D
from align.bundle import response_logits
from align.reward import Reward, call_reward_function, load_reward_function
from align.config import EvalConfig, ModelConfig
from align.errors import ConfigError
from align.generation import decode_responses, sample
from align.modeling import context_length, inspect_model, load_pretrained, load_tokenizer, resolve_model_path
from align.ops import masked_nll_sum, selective_log_softmax, token_correct
from align.rollout import get_engine, sampling_settings
from align.rundir import RunDir, atomic_write_text
from align.runinfo import config_value, read_run_config, read_summary, summary_number
from align.runtime import peak_memory_mb, set_seed


def model_name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "model" else p.name


def check_names(names: list[str], given: bool) -> None:
    """Every display name must be a plain file name: responses are written to
    `responses/<name>.jsonl`, and nothing may land outside `output_dir`. Errors name `names[i]`, or
    `models[i]` for a name taken from a model's path."""
    for i, name in enumerate(names):
        problem = None
        if not isinstance(name, str) or not name.strip():
            problem = "is empty"
        elif "/" in name or "\\" in name or os.sep in name:
            problem = "contains a path separator"
        elif ".." in name:
            problem = "contains '..'"
        elif any(ord(c) < 32 for c in name):
            problem = "contains a control character"
        if problem is None:
            continue
        if given:
            raise ConfigError(f"config key 'names[{i}]' ({name!r}) {problem}; a name becomes the file "
                              "responses/<name>.jsonl in output_dir: use a plain name such as 'sft'")
        raise ConfigError(f"config key 'models[{i}]': the model name {name!r} taken from its path {problem}; "
                          "set config key 'names'")


def lineage_compute(path: str) -> dict[str, Any]:
    """Compute spent to produce the model at `path`: its run's summary plus every run it was built
    from, following each run's `model.path` (the model it started from) and `reward.model` (the
    reward model it was trained against: SFT+PPO pays for its reward model too). Each run counts
    once; stages are listed upstream first. Empty for a model that is not an align run. A damaged
    config.yaml or summary.json along the chain is an error naming the file."""
    totals: dict[str, Any] = {"wall_time_sec": 0.0, "tokens": 0, "episodes": 0, "peak_memory_mb": 0.0, "stages": []}
    seen: set[Path] = set()

    def visit(p: str) -> None:
        run = RunDir.of(p).root
        if not (run / "summary.json").is_file() or run.resolve() in seen:
            return
        seen.add(run.resolve())
        cfg_path = run / "config.yaml"
        config = read_run_config(cfg_path) if cfg_path.is_file() else {}
        for key in ("model.path", "reward.model"):
            upstream = config_value(config, cfg_path, key)
            if upstream:
                visit(upstream)
        summary_path = run / "summary.json"
        summary = read_summary(summary_path)
        totals["wall_time_sec"] += summary_number(summary, summary_path, "train_time_sec", "wall_time_sec")
        totals["tokens"] += int(summary_number(summary, summary_path, "tokens_seen")
                                + summary_number(summary, summary_path, "tokens_generated"))
        totals["episodes"] += int(summary_number(summary, summary_path, "episodes"))
        peak = summary_number(summary, summary_path, "peak_memory_mb")
        totals["peak_memory_mb"] = max(totals["peak_memory_mb"], peak)
        stage = summary.get("stage")
        totals["stages"].append(stage if isinstance(stage, str) else run.name)

    visit(path)
    return totals


@torch.no_grad()
def sequence_logprob_sums(model: Any, rollout: Any, temperature: float) -> torch.Tensor:
    """(B,) summed log-probs of each row's response tokens under `model`."""
    logits = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1],
                             temperature)
    return (selective_log_softmax(logits, rollout.response_ids) * rollout.response_mask).sum(1)


def validation_examples(cfg: EvalConfig, tokenizer: Any) -> list[D.Example]:
    records = D.read_records(cfg.validation)
    fmt = D.detect_format(records)
    D.validate_records(records, fmt)
    return D.tokenize_sft(records, fmt, cfg.prompt_template, tokenizer, cfg.max_length, "drop")[0]


@torch.no_grad()
def validation_metrics(model: Any, tokenizer: Any, cfg: EvalConfig, examples: list[D.Example]) -> dict[str, float]:
    totals = torch.zeros(3)
    for s in range(0, len(examples), cfg.batch_size):
        batch = D.pad_examples(examples[s:s + cfg.batch_size], tokenizer.pad_token_id)
        device = next(model.parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        nll, n = masked_nll_sum(logits, batch["labels"].to(device))
        correct, _ = token_correct(logits, batch["labels"].to(device))
        totals += torch.stack([nll.float(), correct.float(), n.float()]).cpu()
    loss = (totals[0] / totals[2]).item()
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": (totals[1] / totals[2]).item()}


def evaluate_models(cfg: EvalConfig, dry_run: bool = False) -> dict[str, Any]:
    """Run the evaluation and write results.json; returns its content. Every input (model paths,
    prompts, validation file, reward imports) is checked before any weight is loaded; with
    `dry_run`, only that, and the plan is returned."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    out = Path(cfg.output_dir)
    names = cfg.names or [model_name(m) for m in cfg.models]
    check_names(names, given=bool(cfg.names))
    if len(set(names)) != len(names):
        raise_duplicate(names)
    configs = [inspect_model(m, f"models[{i}]") for i, m in enumerate(cfg.models)]
    if cfg.reference:
        inspect_model(cfg.reference, "reference", score_head=False)
    if cfg.reward_model:
        inspect_model(cfg.reward_model, "reward_model", score_head=True)
    lineages = [lineage_compute(m) for m in cfg.models]  # a damaged run config or summary stops us here
    paths = [resolve_model_path(m) for m in cfg.models]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(paths[0], key="models[0]")
    prompts, report = D.load_prompts(cfg.prompts, "auto", cfg.prompt_template, tokenizer, cfg.max_prompt_length,
                                     "drop", max_samples=cfg.max_samples,
                                     context=context_length(*configs),
                                     new_tokens=cfg.response_length)
    gold = load_reward_function(cfg.gold_reward, "gold_reward") if cfg.gold_reward else None
    if cfg.reward_function:
        load_reward_function(cfg.reward_function, "reward_function")
    val_examples = validation_examples(cfg, tokenizer) if cfg.validation else []
    # The best-of-n sampler of each model that gets one, checked before any weight loads.
    best_of_names = (cfg.best_of_models or names[:1]) if cfg.best_of is not None or cfg.best_of_curve else []
    longest = max((len(q.ids) for q in prompts), default=0) + cfg.response_length
    samplers = {name: sampling_settings(cfg.best_of_engine, path, tokenizer, longest,
                                        cfg.batch_size * max(cfg.best_of or 1, *(cfg.best_of_curve or [1])), cfg.seed,
                                        key="best_of_engine",
                                        shorter="lower batch_size or the best-of n, or shorten max_prompt_length / "
                                                "response_length")
                for name, path in zip(names, paths) if name in best_of_names}
    if dry_run:
        return {"stage": "eval", "output_dir": cfg.output_dir, "models": ", ".join(f"{n} ({m})" for n, m in
                                                                                zip(names, cfg.models)),
                "data": f"{len(prompts)} prompts ({report.dropped} dropped as too long); "
                        f"{len(val_examples)} validation examples",
                "reward": cfg.reward_model or cfg.reward_function or "none", "gold_reward": cfg.gold_reward or "none"}
    reward = (Reward(tokenizer, device, model=cfg.reward_model, function=cfg.reward_function, key="reward_model")
              if cfg.reward_model or cfg.reward_function else None)
    reference = (load_pretrained(AutoModelForCausalLM, ModelConfig(path=cfg.reference), tokenizer, trainable=False,
                                 device=device) if cfg.reference else None)
    (out / "responses").mkdir(parents=True, exist_ok=True)
    raw = [q.text for q in prompts]
    texts_in = [tokenizer.decode(q.ids, skip_special_tokens=True) for q in prompts]
    results: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for name, path in zip(names, paths):
        model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=path), tokenizer, trainable=False, device=device)
        set_seed(cfg.seed)
        rows: list[dict[str, Any]] = [{"prompt": t} for t in raw]
        sums: dict[str, float] = {"response_length": 0.0, "eos_rate": 0.0, "reward": 0.0, "gold_reward": 0.0,
                                  "kl_to_reference": 0.0, "sampled_reward": 0.0, "sampled_gold_reward": 0.0}
        for s in range(0, len(prompts), cfg.batch_size):
            chunk = slice(s, s + cfg.batch_size)
            ids = [q.ids for q in prompts[chunk]]
            greedy = sample(model, tokenizer, ids, cfg.response_length, greedy=True)
            texts = decode_responses(tokenizer, greedy)
            sums["response_length"] += greedy.response_mask.sum().item()
            sums["eos_rate"] += greedy.has_eos.sum().item()
            for i, text in enumerate(texts):
                rows[s + i]["response"] = text
            scored = [("reward", "gold_reward", greedy, texts)]
            if cfg.reference is not None or cfg.sampled:
                sampled = sample(model, tokenizer, ids, cfg.response_length, temperature=cfg.kl_temperature)
                sampled_texts = decode_responses(tokenizer, sampled)
                if reference is not None:
                    kl = sequence_logprob_sums(model, sampled, cfg.kl_temperature) - \
                        sequence_logprob_sums(reference, sampled, cfg.kl_temperature)
                    sums["kl_to_reference"] += kl.sum().item()
                if cfg.sampled:
                    scored.append(("sampled_reward", "sampled_gold_reward", sampled, sampled_texts))
                    for i, text in enumerate(sampled_texts):
                        rows[s + i]["sampled_response"] = text
            for r_key, g_key, rollout, rtexts in scored:
                if reward is not None:
                    scores = reward.scores(raw[chunk], rtexts, rollout, texts_in[chunk]).cpu().tolist()
                    sums[r_key] += sum(scores)
                    for i, v in enumerate(scores):
                        rows[s + i][r_key] = v
                if gold is not None:
                    golds = call_reward_function(gold, cfg.gold_reward, raw[chunk], rtexts).tolist()
                    sums[g_key] += sum(golds)
                    for i, v in enumerate(golds):
                        rows[s + i][g_key] = v
        n = len(prompts)
        metrics = {"response_length": sums["response_length"] / n, "eos_rate": sums["eos_rate"] / n}
        if reward is not None:
            metrics["reward"] = sums["reward"] / n
        if gold is not None:
            metrics["gold_reward"] = sums["gold_reward"] / n
        if reference is not None:
            metrics["kl_to_reference"] = sums["kl_to_reference"] / n
        if cfg.sampled:
            metrics.update({k: sums[k] / n for k in ("sampled_reward", "sampled_gold_reward")
                            if (k == "sampled_reward" and reward) or (k == "sampled_gold_reward" and gold)})
        if cfg.validation:
            metrics.update(validation_metrics(model, tokenizer, cfg, val_examples))
        atomic_write_text(out / "responses" / f"{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        results.append({"name": name, "path": str(path), "metrics": metrics, "compute": lineages[names.index(name)],
                        "responses": f"responses/{name}.jsonl"})
        print(f"eval: {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        base = results[-1]
        if name in samplers:
            engine = get_engine(cfg.best_of_engine).build(samplers[name], model, tokenizer, None)
            try:
                if cfg.best_of is not None:
                    results.append(evaluate_best_of_n(model, tokenizer, prompts, reward, gold, cfg, name, base, out,
                                                      engine))
                if cfg.best_of_curve is not None:
                    curves.append(evaluate_best_of_curve(model, tokenizer, prompts, reward, gold, cfg, name, base,
                                                         out, engine))
            finally:
                engine.close()
    content = {"prompts": cfg.prompts, "n_prompts": len(prompts), "baseline": names[0], "models": results,
               "has_reward": reward is not None, "has_gold": gold is not None,
               "wall_time_sec": time.time() - t0, "peak_memory_mb": peak_memory_mb()}
    if curves:
        content["best_of_curves"] = curves
    atomic_write_text(out / "results.json", json.dumps(content, indent=2))
    return content


def evaluate_best_of_n(model: Any, tokenizer: Any, prompts: list[D.Prompt], reward: Reward, gold: Any,
                       cfg: EvalConfig, name: str, base: dict[str, Any], out: Path,
                       engine: Any = None) -> dict[str, Any]:
    """Best-of-n from `model` as a method of its own: n samples per prompt, the learned reward's
    favourite kept, scored like the greedy responses. Compute is the base model's plus the
    sampling (tokens generated, n x prompts episodes, wall time). KL to the reference is not
    estimated for it; `kl_bound` is the analytic upper bound log(n) - (n-1)/n."""
    from align.best_of_n import best_of_n, kl_bound

    n = cfg.best_of
    t0 = time.time()
    set_seed(cfg.seed)
    result = best_of_n(model, tokenizer, prompts, reward, n, cfg.response_length, cfg.best_of_temperature,
                       cfg.batch_size, engine=engine)
    raw = [q.text for q in prompts]
    rows = [{"prompt": t, "response": r, "reward": v} for t, r, v in zip(raw, result.responses, result.scores.tolist())]
    metrics = {"response_length": result.lengths.float().mean().item(),
               "eos_rate": result.has_eos.float().mean().item(), "reward": result.scores.mean().item()}
    if gold is not None:
        golds = call_reward_function(gold, cfg.gold_reward, raw, result.responses).tolist()
        metrics["gold_reward"] = sum(golds) / len(golds)
        for row, v in zip(rows, golds):
            row["gold_reward"] = v
    metrics.update({"best_of_n": n, "kl_bound": kl_bound(n)})
    row_name = f"{name} (best-of-{n})"
    file = f"responses/{name}.best-of-{n}.jsonl"
    atomic_write_text(out / file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    compute = dict(base["compute"])
    compute.update({"wall_time_sec": compute.get("wall_time_sec", 0.0) + time.time() - t0,
                    "tokens": compute.get("tokens", 0) + result.tokens_generated,
                    "episodes": compute.get("episodes", 0) + result.episodes,
                    "peak_memory_mb": max(compute.get("peak_memory_mb", 0.0), peak_memory_mb()),
                    "stages": [*compute.get("stages", []), f"best-of-{n}"],
                    "tokens_generated": result.tokens_generated})
    print(f"eval: {row_name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    return {"name": row_name, "path": base["path"], "metrics": metrics, "compute": compute, "responses": file}


def evaluate_best_of_curve(model: Any, tokenizer: Any, prompts: list[D.Prompt], reward: Reward, gold: Any,
                           cfg: EvalConfig, name: str, base: dict[str, Any], out: Path,
                           engine: Any = None) -> dict[str, Any]:
    """Best-of-n from `model` for every n of `cfg.best_of_curve`, from one draw of N = max(n)
    samples per prompt: each point is the unbiased estimate over the n-subsets of the N
    (align/stats.py `best_of_n_estimate`; the choice by the training score, as best-of-n makes it,
    the learned reward reported raw, as eval reports it). The candidates, their scores and their
    lengths go to `responses/<name>.best-of-curve.jsonl`, so the per-prompt estimates can be
    recomputed. A point's cost is that of drawing n samples: n x prompts episodes, n/N of the
    tokens and of the wall time the N took, on top of the base model's compute."""
    from align.best_of_n import best_of_n, kl_bound
    from align.stats import best_of_n_estimate

    ns = sorted(cfg.best_of_curve or [])
    big = ns[-1]
    t0 = time.time()
    set_seed(cfg.seed)
    result = best_of_n(model, tokenizer, prompts, reward, big, cfg.response_length, cfg.best_of_temperature,
                       cfg.batch_size, engine=engine)
    wall = time.time() - t0
    raw = [q.text for q in prompts]
    choose = result.candidate_scores.tolist()  # (P, N) training scores: what best-of-n picks by
    per_key = {"reward": result.candidate_raw_scores.tolist(), "response_length": result.candidate_lengths.tolist()}
    if gold is not None:
        golds = call_reward_function(gold, cfg.gold_reward, [p for p in raw for _ in range(big)],
                                     [t for c in result.candidates for t in c]).tolist()
        per_key["gold_reward"] = [golds[i * big:(i + 1) * big] for i in range(len(raw))]
    rows = [{"prompt": p, "responses": c, "score": s, **{k: v[i] for k, v in per_key.items()}}
            for i, (p, c, s) in enumerate(zip(raw, result.candidates, choose))]
    file = f"responses/{name}.best-of-curve.jsonl"
    atomic_write_text(out / file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    points = []
    for n in ns:
        metrics = {k: sum(best_of_n_estimate(s, v, n) for s, v in zip(choose, vals)) / len(prompts)
                   for k, vals in per_key.items()}
        tokens = round(result.tokens_generated * n / big)
        compute = dict(base["compute"])
        compute.update({"wall_time_sec": compute.get("wall_time_sec", 0.0) + wall * n / big,
                        "tokens": compute.get("tokens", 0) + tokens,
                        "episodes": compute.get("episodes", 0) + n * len(prompts),
                        "peak_memory_mb": max(compute.get("peak_memory_mb", 0.0), peak_memory_mb()),
                        "stages": [*compute.get("stages", []), f"best-of-{n}"], "tokens_generated": tokens})
        points.append({"n": n, "metrics": {**metrics, "kl_bound": kl_bound(n)}, "compute": compute})
        print(f"eval: {name} (best-of-{n} of {big}): " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
              flush=True)
    return {"model": name, "samples": big, "estimator": "unbiased over n-subsets of the samples (Nakano et al. 2021)",
            "temperature": cfg.best_of_temperature, "responses": file, "points": points}


def infer_eval_defaults(models: list[str]) -> dict[str, Any]:
    """Eval settings read off the first PPO run among `models`: its eval prompts, reward, gold reward,
    reference (the SFT model) and prompt template; and the SFT run's validation file. A damaged run
    config is an error naming the file and key."""
    for m in models:
        if not isinstance(m, str):
            continue  # reported by the config's validation
        cfg_path = RunDir.of(m).root / "config.yaml"
        if not cfg_path.is_file():
            continue
        cfg = read_run_config(cfg_path)
        if "ppo" not in cfg:
            continue

        def get(key: str, kind: type = str, required: bool = False) -> Any:
            return config_value(cfg, cfg_path, key, kind, required)

        out: dict[str, Any] = {"reference": get("model.path", required=True),
                               "prompt_template": get("data.prompt_template", required=True),
                               "response_length": get("ppo.response_length", int, required=True)}
        for key, name in (("reward.model", "reward_model"), ("reward.function", "reward_function"),
                          ("eval.prompts", "prompts"), ("eval.gold_reward", "gold_reward")):
            if get(key):
                out[name] = get(key)
        sft_cfg = RunDir.of(out["reference"]).root / "config.yaml"
        if sft_cfg.is_file():
            validation = config_value(read_run_config(sft_cfg), sft_cfg, "data.validation")
            if validation:
                out["validation"] = validation
        return out
    return {}


def raise_duplicate(names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ConfigError(f"model names must differ; '{dup[0]}' appears twice (set config key 'names')")
