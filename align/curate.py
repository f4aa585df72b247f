"""`align curate`: filter SFT data down to a target size, and say what was dropped and why.

Four steps, in this order, each on what the previous one kept:
1. score threshold: a record scoring below `min_score` is dropped (a score equal to it is kept).
   Scores come from a field of the records (`score_field`, e.g. the `score` that `align sample`
   writes) or from a reward model (`reward_model`, read at the last token of
   `[BOS] prompt response [EOS]`, as `align rm` trained it and PPO reads it).
2. deduplication, exact after normalisation: two records are duplicates when their prompt and
   response are equal after Unicode NFKC, case folding and collapsing every run of whitespace to
   one space. Of a group of duplicates the highest-scoring one is kept (the first on a tie).
   Near-duplicates that differ after normalisation (a changed word) are kept: nothing here
   measures similarity.
3. prompt diversity: at most `max_per_prompt` responses per prompt (prompts compared normalised,
   as above), the highest-scoring ones.
4. target size: when more than `target` records are left, a greedy max-coverage selection over
   prompts picks them: every prompt's best response first (highest score first), then every
   prompt's second best, and so on, so `target` records cover as many distinct prompts as they
   can. Fewer than `target` left is an error: a comparison "at equal data size" must not quietly
   train on less.

The selection follows LIMA (Zhou et al. 2023, "LIMA: Less Is More for Alignment": a small set
chosen for quality and for the diversity of its prompts) and Deita (Liu et al. 2024, "What Makes
Good Data for Alignment?": sort by a quality score, then take examples greedily while they add
diversity); Deita measures diversity by embedding distance, here the unit of diversity is the
prompt. The kept records are written unchanged, in their input order (with the reward model's
score added as `score`); the report (JSON) counts each reason for dropping, with the first few
dropped records' `file:line`, and is written after the data, so its presence marks a complete run.

`select` is the pure part (no files, no torch), tested against hand-computed cases.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import data as D
from align.config import CurateConfig
from align.errors import AlignError, DataError
from align.rundir import atomic_write_text

REASONS = ("below_min_score", "duplicate", "over_max_per_prompt", "over_target")
"""Why a record was dropped, in the order the steps run."""
SHOWN = 5
"""Dropped records named (by `file:line`) per reason in the report."""
SFT_FORMATS = ("chat", "alpaca", "prompt_response", "prompt_completion")


def normalise(text: str) -> str:
    """The text duplicates are compared on: NFKC, case-folded, whitespace runs as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass(frozen=True)
class Item:
    """What the selection needs of one record."""

    prompt: str
    """Its prompt, normalised: the unit of diversity."""
    text: str
    """Its prompt and response, normalised: the duplicate key."""
    score: float | None = None


@dataclass
class Selection:
    kept: list[int]
    """Indices of the kept items, ascending (input order)."""
    dropped: dict[str, list[int]] = field(default_factory=dict)
    """Reason (one of REASONS) -> indices dropped for it, ascending."""


def _best_first(indices: list[int], items: list[Item]) -> list[int]:
    """`indices` by descending score, ties (and no scores) in input order."""
    return sorted(indices, key=lambda i: (-(items[i].score or 0.0), i))


def _groups(indices: list[int], items: list[Item], key: str) -> dict[str, list[int]]:
    """Items grouped by `key` ('prompt' or 'text'), each group best first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[getattr(items[i], key)].append(i)
    return {k: _best_first(v, items) for k, v in groups.items()}


def select(items: list[Item], min_score: float | None = None, dedup: bool = True,
           max_per_prompt: int | None = None, target: int | None = None) -> Selection:
    """The four steps of the module docstring. Raises ValueError when `min_score` is set and an
    item has no score, or when fewer than `target` items survive steps 1-3."""
    dropped: dict[str, list[int]] = {r: [] for r in REASONS}
    alive = list(range(len(items)))
    if min_score is not None:
        if any(items[i].score is None for i in alive):
            raise ValueError("min_score needs a score for every record")
        dropped["below_min_score"] = [i for i in alive if items[i].score < min_score]  # type: ignore[operator]
        alive = [i for i in alive if items[i].score >= min_score]  # type: ignore[operator]
    if dedup:
        keep = {g[0] for g in _groups(alive, items, "text").values()}
        dropped["duplicate"] = [i for i in alive if i not in keep]
        alive = [i for i in alive if i in keep]
    if max_per_prompt is not None:
        keep = {i for g in _groups(alive, items, "prompt").values() for i in g[:max_per_prompt]}
        dropped["over_max_per_prompt"] = [i for i in alive if i not in keep]
        alive = [i for i in alive if i in keep]
    if target is not None:
        if len(alive) < target:
            raise ValueError(f"only {len(alive)} of {len(items)} records are left after the filters, fewer than "
                             f"the target {target}")
        # Greedy max-coverage: round r takes every prompt's r-th best, best first within the round.
        rank = {i: r for g in _groups(alive, items, "prompt").values() for r, i in enumerate(g)}
        order = sorted(alive, key=lambda i: (rank[i], -(items[i].score or 0.0), i))
        keep = set(order[:target])
        dropped["over_target"] = [i for i in alive if i not in keep]
        alive = [i for i in alive if i in keep]
    return Selection(alive, dropped)


# ----------------------------------------------------------------------------------------------
# Records, scores, files


def _texts(rec: D.Record, fmt: str) -> tuple[str, str]:
    """A record's (prompt, whole record) texts, before normalisation: for chat, the conversation
    before its last assistant turn, and every turn."""
    f = rec.fields
    if fmt == "chat":
        messages = f["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        turns = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(turns[:last]), "\n".join(turns)
    response = {"alpaca": "output", "prompt_response": "response", "prompt_completion": "completion"}[fmt]
    prompt = D.prompt_fields(rec, fmt)["prompt"]
    return prompt, f"{prompt}\n{f[response]}"


def _field_scores(records: list[D.Record], name: str) -> list[float]:
    scores, problems = [], []
    for rec in records:
        value = rec.fields.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{rec.where}: score field '{name}' must be a finite number, got {value!r}")
        else:
            scores.append(float(value))
    if problems:
        raise DataError(problems)
    return scores


def reward_model_scores(records: list[D.Record], fmt: str, reward_model: str, template: str | None,
                        batch_size: int, normalize: bool = True) -> list[float]:
    """The reward model's raw score of each record (the bias of `align rm --set normalize_with` removed
    when `normalize`), on the sequence `align rm` trains on: `[BOS] prompt response [EOS]` (a chat
    record: its rendered conversation)."""
    import torch

    from align.generation import Rollout, left_pad
    from align.modeling import resolve_model_path, load_tokenizer
    from align.reward import Reward
    from align.runinfo import run_prompt_template

    path = resolve_model_path(reward_model)
    template = template or run_prompt_template(reward_model) or "{prompt}"
    tokenizer = load_tokenizer(path, padding_side="left", key="reward_model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The reward model's own tokenizer as the "policy" one: the ids go straight into the model.
    reward = Reward(tokenizer, device, model=reward_model, normalize=normalize, key="reward_model")
    prefix = [] if fmt == "chat" else D.bos_prefix(tokenizer)
    seqs = [D.encode_segments(tokenizer, D.sft_segments(rec, fmt, template, tokenizer), add_eos=fmt != "chat",
                              prefix=prefix).input_ids for rec in records]
    scores: list[float] = []
    for s in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[s:s + batch_size], tokenizer.pad_token_id, device)  # (B, T)
        empty = ids[:, :0]  # the whole record sits in the "prompt" part; no sampled response
        rollout = Rollout(ids, mask, empty, empty, torch.ones(len(ids), dtype=torch.bool, device=device))
        scores += reward.scores([], [], rollout, []).tolist()
    return scores


def curate(cfg: CurateConfig) -> dict[str, Any]:
    """Read `cfg.data`, score, select, write the kept records to `cfg.out` and the report to
    `cfg.report` (default `<out>.report.json`), the report last. Returns the report."""
    t0 = time.time()
    out = Path(cfg.out)
    report_path = Path(cfg.report) if cfg.report else out.with_name(out.name + ".report.json")
    for path, key in ((out, "out"), (report_path, "report")):
        if path.exists():
            raise AlignError(f"{key} '{path}' already exists; choose another file or remove it")
    records = D.read_records(cfg.data)
    fmt = D.detect_format(records, cfg.format, {k: v for k, v in D.FORMAT_FIELDS.items() if k in SFT_FORMATS})
    D.validate_records(records, fmt)
    if cfg.score_field:
        scores: list[float] | None = _field_scores(records, cfg.score_field)
    elif cfg.reward_model:
        scores = reward_model_scores(records, fmt, cfg.reward_model, cfg.prompt_template, cfg.batch_size,
                                     cfg.normalize)
    else:
        scores = None
    items = []
    for i, rec in enumerate(records):
        prompt, text = _texts(rec, fmt)
        items.append(Item(normalise(prompt), normalise(text), scores[i] if scores is not None else None))
    try:
        sel = select(items, cfg.min_score, cfg.dedup, cfg.max_per_prompt, cfg.target)
    except ValueError as e:
        raise AlignError(f"curate '{cfg.data}': {e}; lower 'target' or loosen the filters") from None

    lines = []
    for i in sel.kept:
        row = dict(records[i].fields)
        if cfg.reward_model:
            row["score"] = scores[i]  # type: ignore[index]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(lines))

    def mean(idx: list[int]) -> float | None:
        return sum(scores[i] for i in idx) / len(idx) if scores is not None and idx else None  # type: ignore[index]

    report: dict[str, Any] = {
        "input": len(records), "kept": len(sel.kept),
        **{f"dropped/{r}": len(sel.dropped[r]) for r in REASONS},
        "prompts_in": len({it.prompt for it in items}), "prompts_kept": len({items[i].prompt for i in sel.kept}),
        "score_mean_in": mean(list(range(len(items)))), "score_mean_kept": mean(sel.kept),
        "score_source": f"field '{cfg.score_field}'" if cfg.score_field else
                        "reward model" if cfg.reward_model else None,
        "examples_dropped": {r: [records[i].where for i in sel.dropped[r][:SHOWN]] for r in REASONS
                             if sel.dropped[r]},
        "settings": {"min_score": cfg.min_score, "dedup": cfg.dedup, "max_per_prompt": cfg.max_per_prompt,
                     "target": cfg.target},
        "out": str(out), "wall_time_sec": time.time() - t0,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report
