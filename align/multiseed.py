"""Comparisons over seeds: `align run RECIPE --seeds 0-4` writes `<root>/seed-N/` per seed, and this
module reads them back as one comparison (torch-free; numbers from align/stats.py).

For every model (by display name) and metric of `align eval`:
- the mean over seeds with a 95% percentile-bootstrap interval over seeds (seeds are the unit: a
  seed reruns the data, the initial weights and every stage);
- within each seed, the 95% bootstrap interval over prompts of the greedy gold reward, shown
  separately (it is what one seed alone could tell);
- the paired comparison against the baseline (the first model, SFT) on the per-prompt gold
  reward, pairs of the same prompt and seed: the mean difference with a hierarchical paired
  bootstrap interval (seeds, then prompts), wins/losses/ties and the exact sign test; a
  difference is called significant only when the interval excludes 0 and p < 0.05
  (align/stats.py `paired_difference`), and every other difference is marked "n.s.".

`values()` gives the per-seed numbers `align run --check` tests a recipe's `expect:` block on:
`<model>:<metric>` for eval metrics, `<stage>/<summary key>` for each stage's summary.json.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.stats import Comparison, Interval, bootstrap_ci, paired_difference, prompt_bootstrap_ci

SEED_DIR = re.compile(r"^seed-(\d+)$")
METRICS = ("gold_reward", "reward", "kl_to_reference", "kl_bound", "sampled_gold_reward", "perplexity",
           "token_accuracy", "response_length")
"""The eval metrics the table shows, in this order (those present)."""


@dataclass
class SeedRun:
    """One seed's pipeline output."""

    seed: int
    root: Path
    results: dict[str, Any]
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    """stage -> its summary.json."""

    def per_prompt(self, model: str, key: str = "gold_reward") -> list[float]:
        entry = next(m for m in self.results["models"] if m["name"] == model)
        path = self.root / "eval" / entry["responses"]
        return [float(json.loads(line)[key]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_runs(root: str | Path) -> list[SeedRun]:
    """Every `seed-N/` under `root` whose evaluation is complete, in seed order."""
    root = Path(root)
    runs = []
    for d in sorted((p for p in root.iterdir() if p.is_dir() and SEED_DIR.match(p.name)),
                    key=lambda p: int(SEED_DIR.match(p.name).group(1))):
        results = d / "eval" / "results.json"
        if not results.is_file():
            continue
        run = SeedRun(int(SEED_DIR.match(d.name).group(1)), d, _read(results))
        for summary in d.glob("*/summary.json"):
            run.summaries[summary.parent.name] = _read(summary)
        runs.append(run)
    if not runs:
        raise AlignError(f"'{root}' holds no seed-N/ directory with eval/results.json (run `align run RECIPE --seeds ...`)")
    return runs


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignError(f"{path}: unreadable ({type(e).__name__})") from None


def values(runs: list[SeedRun]) -> dict[int, dict[str, float]]:
    """Per seed: `<model>:<metric>` for every eval metric, `<stage>/<key>` for every numeric key of
    every stage's summary (e.g. `rm/val/accuracy`, `ppo/wall_time_sec`)."""
    out: dict[int, dict[str, float]] = {}
    for run in runs:
        row: dict[str, float] = {}
        for m in run.results["models"]:
            for key, v in m["metrics"].items():
                if isinstance(v, (int, float)):
                    row[f"{m['name']}:{key}"] = float(v)
            for key in ("wall_time_sec", "tokens", "episodes"):
                if isinstance(m.get("compute", {}).get(key), (int, float)):
                    row[f"{m['name']}:compute/{key}"] = float(m["compute"][key])
        for stage, summary in run.summaries.items():
            for key, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    row[f"{stage}/{key}"] = float(v)
        out[run.seed] = row
    return out


@dataclass
class Summary:
    """What the multi-seed report shows."""

    seeds: list[int]
    models: list[str]
    baseline: str
    intervals: dict[str, dict[str, Interval]]
    """model -> metric -> mean and 95% interval over seeds."""
    prompt_intervals: dict[str, dict[int, Interval]]
    """model -> seed -> 95% interval over prompts of the greedy gold reward."""
    paired: dict[str, Comparison]
    """model -> paired comparison with the baseline on the per-prompt gold reward."""
    n_prompts: int


def summarize(runs: list[SeedRun]) -> Summary:
    first = runs[0].results
    models = [m["name"] for m in first["models"]]
    for run in runs[1:]:
        if [m["name"] for m in run.results["models"]] != models:
            raise AlignError(f"seed {run.seed} evaluated other models than seed {runs[0].seed}; "
                             "every seed must run the same recipe")
    baseline = first["baseline"]
    vals = values(runs)
    intervals: dict[str, dict[str, Interval]] = {}
    for model in models:
        intervals[model] = {}
        for metric in METRICS:
            seq = [vals[r.seed].get(f"{model}:{metric}") for r in runs]
            if all(v is not None and math.isfinite(v) for v in seq):
                intervals[model][metric] = bootstrap_ci(seq)
    has_gold = bool(first.get("has_gold"))
    prompt_intervals: dict[str, dict[int, Interval]] = {}
    paired: dict[str, Comparison] = {}
    if has_gold:
        for model in models:
            per = {r.seed: r.per_prompt(model) for r in runs}
            prompt_intervals[model] = {s: prompt_bootstrap_ci(v) for s, v in per.items()}
            if model != baseline:
                paired[model] = paired_difference([per[r.seed] for r in runs],
                                                  [r.per_prompt(baseline) for r in runs])
    return Summary([r.seed for r in runs], models, baseline, intervals, prompt_intervals, paired, first["n_prompts"])


def _cell(iv: Interval | None, digits: int = 3) -> str:
    if iv is None:
        return "—"
    if iv.n == 1:
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def render_markdown(s: Summary, provenance: str = "") -> str:
    """The report: the table over seeds, the paired comparisons, the per-seed prompt intervals."""
    shown = [m for m in METRICS if any(m in s.intervals[model] for model in s.models)]
    lines = [f"# Comparison over {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))})", "",
             f"{s.n_prompts} held-out prompts per seed. Each cell: mean over seeds [95% percentile bootstrap "
             "interval over seeds].", "",
             "| model | " + " | ".join(shown) + " |", "| --- |" + " --- |" * len(shown)]
    for model in s.models:
        lines.append(f"| {model} | " + " | ".join(_cell(s.intervals[model].get(m)) for m in shown) + " |")
    if s.paired:
        lines += ["", f"## Against {s.baseline} (greedy gold reward, paired by prompt and seed)", "",
                  "| model | mean difference [95% CI] | wins / losses / ties | sign test p | verdict |",
                  "| --- | --- | --- | --- | --- |"]
        for model, c in s.paired.items():
            verdict = "significant" if c.significant else "n.s. (not significant)"
            lines.append(f"| {model} | {c.mean_diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {c.wins} / {c.losses} / "
                         f"{c.ties} | {c.sign_test_p:.2g} | {verdict} |")
        lines += ["", "Interval: hierarchical paired bootstrap (seeds, then prompts within each seed). A difference "
                  "is called significant only when its interval excludes 0 and the exact sign test gives p < 0.05."]
        sig = [m for m, c in s.paired.items() if c.significant]
        ns = [m for m, c in s.paired.items() if not c.significant]
        text = []
        if sig:
            text.append(f"Significantly different from {s.baseline}: {', '.join(sig)}.")
        if ns:
            text.append(f"Not significantly different from {s.baseline}: {', '.join(ns)}.")
        lines += ["", " ".join(text)]
    if s.prompt_intervals:
        lines += ["", "## Within each seed (greedy gold reward, 95% bootstrap interval over prompts)", "",
                  "| model | " + " | ".join(f"seed {x}" for x in s.seeds) + " |", "| --- |" + " --- |" * len(s.seeds)]
        for model in s.models:
            lines.append(f"| {model} | " + " | ".join(_cell(s.prompt_intervals[model][x]) for x in s.seeds) + " |")
    if provenance:
        lines += ["", "## Provenance", "", provenance]
    return "\n".join(lines) + "\n"


def frontier_plot(s: Summary, out: Path) -> Path | None:
    """Gold reward against KL to the reference, every model with its 95% intervals over seeds (the
    over-optimisation frontier, Gao et al. 2022)."""
    # best-of-n has no sampled KL: it is placed at its analytic bound, log n - (n-1)/n, and says so
    pts = [(m, s.intervals[m].get("kl_to_reference") or s.intervals[m].get("kl_bound"), s.intervals[m].get("gold_reward"),
            "kl_to_reference" not in s.intervals[m]) for m in s.models]
    pts = [(m, kl, g, bound) for m, kl, g, bound in pts if kl is not None and g is not None]
    if not pts:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for m, kl, g, bound in pts:
        ax.errorbar(kl.mean, g.mean, xerr=[[kl.mean - kl.low], [kl.high - kl.mean]],
                    yerr=[[g.mean - g.low], [g.high - g.mean]], fmt="^" if bound else "o", capsize=3,
                    label=f"{m} (KL bound)" if bound else m)
    ax.set(xlabel="KL(model || SFT), nats", ylabel="greedy gold reward",
           title=f"Gold reward vs KL, mean and 95% CI over {len(s.seeds)} seeds")
    return _save(fig, ax, out / "gold_vs_kl.png")


def curves_plot(runs: list[SeedRun], out: Path) -> Path | None:
    """Greedy gold reward on the eval prompts against episodes, from step 0 (the SFT point), for
    every RL stage: the mean over seeds and the band from the lowest to the highest seed."""
    import numpy as np

    series: dict[str, list[tuple[list[float], list[float]]]] = {}
    for run in runs:
        for stage in run.summaries:
            rows = _metrics(run.root / stage / "metrics.jsonl")
            pts = [(r["episode"], r["eval/gold_reward"]) for r in rows if "eval/gold_reward" in r and "episode" in r]
            if pts:
                series.setdefault(stage, []).append(([p[0] for p in pts], [p[1] for p in pts]))
    if not series:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for stage, per_seed in series.items():
        n = min(len(x) for x, _ in per_seed)
        x = np.array(per_seed[0][0][:n], dtype=float)
        y = np.array([ys[:n] for _, ys in per_seed], dtype=float)
        ax.plot(x, y.mean(0), label=f"sft+{stage}")
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    ax.set(xlabel="episodes (responses sampled)", ylabel="greedy gold reward (eval prompts)",
           title=f"Gold reward at matched compute, {len(runs)} seeds (band: min-max)")
    return _save(fig, ax, out / "gold_vs_episodes.png")


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _metrics(path: Path) -> list[dict[str, Any]]:
    from align.rundir import read_metrics

    return read_metrics(path) if path.is_file() else []


def write_report(root: str | Path, out: str | Path | None = None, provenance: str = "") -> dict[str, Any]:
    """Read every seed under `root`, write `<out>/multiseed.md` (and the plots); return the
    summary, the per-seed values and the paths written."""
    runs = seed_runs(root)
    out = Path(out) if out is not None else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    text = render_markdown(summary, provenance)
    plots = [p for p in (frontier_plot(summary, out), curves_plot(runs, out)) if p is not None]
    if plots:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    from align.rundir import atomic_write_text

    atomic_write_text(out / "multiseed.md", text)
    return {"summary": summary, "values": values(runs), "report": out / "multiseed.md", "text": text}
