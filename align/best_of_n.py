"""Best-of-n: sample n responses per prompt, keep the one the reward scores highest.

Used two ways, by the same function:
- `align sample MODEL --best-of K`: rejection-sampled SFT data, `{prompt, response, score}` JSONL
  (one of the data strategies the SFT literature recommends: distil, best-of-K, filter);
- `align eval` with `best_of: n`: best-of-n as an inference-time method, a row of its own beside
  the trained ones, with its sampling cost (tokens generated, episodes = n x prompts).
- `align eval` with `best_of_curve: [1, 2, ..., N]`: one draw of N samples per prompt, from which
  every n <= N is estimated (align/stats.py `best_of_n_estimate`); that needs every candidate,
  so `BestOfN` keeps them all with their raw scores and lengths.

Each prompt is repeated n times in one generate call (prompt-major rows: p0 x n, p1 x n, ...), so
with n = 1 the call, and under the same seed the sample, is exactly plain sampling's.
The KL of best-of-n to its base policy is at most log(n) - (n - 1) / n nats (Beirami et al. 2024,
"Theoretical guarantees on the best-of-n alignment policy"); eval reports that bound.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align import data as D
from align.reward import Reward
from align.config import ModelConfig, SampleConfig
from align.errors import AlignError
from align.generation import decode_responses, sample
from align.modeling import load_pretrained, load_tokenizer, resolve_model_path
from align.rollout import get_engine, sampling_settings
from align.rundir import atomic_write_text
from align.runtime import set_seed


@dataclass
class BestOfN:
    """The kept response of each of P prompts, and what choosing it cost."""

    responses: list[str]
    """(P,) the highest-scoring of each prompt's n responses."""
    scores: torch.Tensor
    """(P,) its reward."""
    candidate_scores: torch.Tensor
    """(P, n) every sampled response's reward (row i: prompt i's n samples, in sampling order)."""
    candidates: list[list[str]]
    """(P, n) every sampled response, in the order of `candidate_scores`."""
    candidate_raw_scores: torch.Tensor
    """(P, n) their raw reward, before `shape_scores` (what `align eval` reports)."""
    candidate_lengths: torch.Tensor
    """(P, n) their lengths in tokens, EOS included."""
    lengths: torch.Tensor
    """(P,) kept response length in tokens, EOS included."""
    has_eos: torch.Tensor
    """(P,) whether the kept response ended with EOS."""
    tokens_generated: int
    """Response tokens sampled over all P x n candidates: the sampling cost."""
    episodes: int
    """Responses sampled: P x n."""


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || base) in nats: log(n) - (n - 1) / n (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(model: Any, tokenizer: Any, prompts: list[D.Prompt], reward: Reward, n: int, response_length: int,
              temperature: float = 1.0, batch_size: int = 16, engine: Any = None) -> BestOfN:
    """For each prompt, sample n responses at `temperature` and keep the highest-scoring one (the
    first of equal scores). `batch_size` counts prompts: each generate call holds batch_size x n rows.
    `engine`: the rollout engine that samples (align/rollout.py, started on `model`'s weights);
    None: HF generate on `model`, which is what the `hf` engine calls."""
    kept, scores, cand, lengths, eos = [], [], [], [], []
    texts_all: list[list[str]] = []
    raw_all, lengths_all = [], []
    tokens = 0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        rows = [q for q in chunk for _ in range(n)]  # prompt-major: p0 x n, p1 x n, ...
        ids = [q.ids for q in rows]
        rollout = (engine.generate(ids, response_length, temperature=temperature) if engine is not None
                   else sample(model, tokenizer, ids, response_length, temperature=temperature))
        texts = decode_responses(tokenizer, rollout)
        # training scores (align/reward.py): the same shaping as the online methods train on
        raw, score = reward.training_scores([q.text for q in rows], texts, rollout,
                                            [tokenizer.decode(q.ids, skip_special_tokens=True) for q in rows])
        score = score.cpu().view(len(chunk), n)  # (B, n)
        best = score.argmax(dim=1)  # (B,) argmax returns the first maximal index
        pick = torch.arange(len(chunk)) * n + best  # (B,) row of each kept response
        kept += [texts[i] for i in pick.tolist()]
        scores.append(score.gather(1, best[:, None]).squeeze(1))
        cand.append(score)
        row_lengths = rollout.response_mask.sum(1).cpu()
        texts_all += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
        raw_all.append(raw.cpu().view(len(chunk), n))
        lengths_all.append(row_lengths.view(len(chunk), n))
        lengths.append(row_lengths[pick])
        eos.append(rollout.has_eos.cpu()[pick])
        tokens += int(row_lengths.sum())
    return BestOfN(kept, torch.cat(scores), torch.cat(cand), texts_all, torch.cat(raw_all), torch.cat(lengths_all),
                   torch.cat(lengths), torch.cat(eos), tokens, len(prompts) * n)


def sft_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are SFT examples: a kept response that is empty (or whitespace: the model chose
    EOS at once) is none, and `align sft` refuses it, so its prompt is left out (counted as `empty`)."""
    return [row for row in rows if row["response"].strip()]


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """`align sample`: best-of-K responses for every prompt of `cfg.prompts`, written to `cfg.out`
    as `{prompt, response, score}` lines (SFT data in the `prompt_response` format); a prompt whose
    kept response is empty is left out (`sft_rows`)."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    out = Path(cfg.out)
    if out.exists():
        raise AlignError(f"--out '{out}' already exists; choose another file or remove it")
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, padding_side="left", key="model")
    template = cfg.prompt_template or "{prompt}"
    prompts, report = D.load_prompts(cfg.prompts, "auto", template, tokenizer, cfg.max_prompt_length, "drop",
                                     max_samples=cfg.max_samples)
    settings = sampling_settings(cfg.engine, path, tokenizer,
                                 max((len(q.ids) for q in prompts), default=0) + cfg.response_length,
                                 cfg.batch_size * cfg.best_of, cfg.seed, key="engine",
                                 shorter="lower batch_size or best_of, or shorten max_prompt_length / response_length")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward = Reward(tokenizer, device, model=cfg.reward_model, function=cfg.reward_function,
                    normalize=cfg.normalize, key="reward")
    model = load_pretrained(AutoModelForCausalLM, ModelConfig(path=path), tokenizer, trainable=False, device=device)
    engine = get_engine(cfg.engine).build(settings, model, tokenizer, None)
    try:
        set_seed(cfg.seed)
        result = best_of_n(model, tokenizer, prompts, reward, cfg.best_of, cfg.response_length, cfg.temperature,
                           cfg.batch_size, engine=engine)
    finally:
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": q.text, "response": r, "score": s}
            for q, r, s in zip(prompts, result.responses, result.scores.tolist())]
    kept = sft_rows(rows)
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return {"prompts": len(prompts), "dropped": report.dropped, "empty": len(rows) - len(kept), "best_of": cfg.best_of,
            "mean_best_score": result.scores.mean().item(),
            "mean_sample_score": result.candidate_scores.mean().item(),
            "tokens_generated": result.tokens_generated, "episodes": result.episodes,
            "wall_time_sec": time.time() - t0}

