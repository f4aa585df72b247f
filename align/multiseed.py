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

When eval drew a best-of-n curve (`best_of_curve`), each n is a point of its own: its gold and
learned reward, KL bound and sampling cost with intervals over seeds, and its paired comparison
with the baseline on the per-prompt estimates (align/stats.py `best_of_n_estimate`, recomputed
from the candidates eval wrote). The win-rate chart shows each model's wins, ties and losses
against the baseline per prompt and seed, on gold and on learned reward, non-significant ones marked.

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
from align.stats import Comparison, Interval, best_of_n_estimate, bootstrap_ci, paired_difference, prompt_bootstrap_ci

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
        return [float(row[key]) for row in self.rows(model)]

    def rows(self, model: str) -> list[dict[str, Any]]:
        """The model's responses file, one row per prompt."""
        entry = next(m for m in self.results["models"] if m["name"] == model)
        return _read_rows(self.root / "eval" / entry["responses"])

    def curves(self) -> dict[str, dict[str, Any]]:
        """model -> its best-of-n curve as eval wrote it (results.json `best_of_curves`)."""
        return {c["model"]: c for c in self.results.get("best_of_curves") or []}

    def curve_per_prompt(self, model: str, n: int, key: str = "gold_reward") -> list[float]:
        """Per prompt, the best-of-n estimate of `key` from the curve's candidates."""
        rows = _read_rows(self.root / "eval" / self.curves()[model]["responses"])
        return [best_of_n_estimate(r["score"], r[key], n) for r in rows]


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


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignError(f"{path}: unreadable ({type(e).__name__})") from None


def curve_name(model: str, n: int) -> str:
    """A best-of-n curve point's name in `values()` and `expect:` blocks, e.g. 'sft (best-of-16, curve)'."""
    return f"{model} (best-of-{n}, curve)"


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
        for model, curve in run.curves().items():
            for point in curve["points"]:
                name = curve_name(model, point["n"])
                row.update({f"{name}:{k}": float(v) for k, v in point["metrics"].items()})
                row.update({f"{name}:compute/{k}": float(point["compute"][k])
                            for k in ("wall_time_sec", "tokens", "episodes", "tokens_generated")})
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
    paired_reward: dict[str, Comparison] = field(default_factory=dict)
    """model -> paired comparison with the baseline on the per-prompt learned reward."""
    curves: dict[str, list[CurvePoint]] = field(default_factory=dict)
    """model -> its best-of-n curve, by increasing n."""
    curve_samples: dict[str, int] = field(default_factory=dict)
    """model -> the samples per prompt its curve was estimated from."""


@dataclass
class CurvePoint:
    """One n of a best-of-n curve over seeds."""

    n: int
    intervals: dict[str, Interval]
    """metric (gold_reward, reward, kl_bound, response_length) or compute/<key> -> mean and 95% interval over seeds."""
    paired: Comparison | None
    """Against the baseline's greedy gold reward, per prompt and seed; None without a gold reward."""


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
    paired_reward: dict[str, Comparison] = {}
    if first.get("has_reward"):
        base_rows = {r.seed: r.rows(baseline) for r in runs}
        for model in models:
            if model == baseline:
                continue
            method, base = [], []
            for r in runs:
                rows = r.rows(model)
                b = [float(x["reward"]) for x in base_rows[r.seed]]
                # the same response scores the same: batch padding must not turn a tie into a win
                method.append([b[i] if x.get("response") == base_rows[r.seed][i].get("response") else float(x["reward"])
                               for i, x in enumerate(rows)])
                base.append(b)
            paired_reward[model] = paired_difference(method, base)
    curves, samples = _summarize_curves(runs, vals, baseline, has_gold)
    return Summary([r.seed for r in runs], models, baseline, intervals, prompt_intervals, paired, first["n_prompts"],
                   paired_reward, curves, samples)


def _summarize_curves(runs: list[SeedRun], vals: dict[int, dict[str, float]], baseline: str,
                      has_gold: bool) -> tuple[dict[str, list[CurvePoint]], dict[str, int]]:
    shape = {m: [p["n"] for p in c["points"]] for m, c in runs[0].curves().items()}
    for run in runs[1:]:
        if {m: [p["n"] for p in c["points"]] for m, c in run.curves().items()} != shape:
            raise AlignError(f"seed {run.seed} drew other best-of-n curves than seed {runs[0].seed}; "
                             "every seed must run the same recipe")
    curves: dict[str, list[CurvePoint]] = {}
    for model, ns in shape.items():
        curves[model] = []
        for n in sorted(ns):
            name = curve_name(model, n)
            keys = [k for k in vals[runs[0].seed] if k.startswith(f"{name}:")]
            ivs = {k.split(":", 1)[1]: bootstrap_ci([vals[r.seed][k] for r in runs]) for k in keys}
            pair = paired_difference([r.curve_per_prompt(model, n) for r in runs],
                                     [r.per_prompt(baseline) for r in runs]) if has_gold else None
            curves[model].append(CurvePoint(n, ivs, pair))
    return curves, {m: int(runs[0].curves()[m]["samples"]) for m in shape}


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
    if s.paired_reward:
        lines += ["", f"## Against {s.baseline} (learned reward, paired by prompt and seed)", "",
                  "| model | mean difference [95% CI] | wins / losses / ties | sign test p | verdict |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [_paired_row(model, c) for model, c in s.paired_reward.items()]
        lines += ["", "The same interval and rule; a prompt where both gave the same response is a tie."]
    for model, points in s.curves.items():
        lines += _curve_section(s, model, points)
    if s.prompt_intervals:
        lines += ["", "## Within each seed (greedy gold reward, 95% bootstrap interval over prompts)", "",
                  "| model | " + " | ".join(f"seed {x}" for x in s.seeds) + " |", "| --- |" + " --- |" * len(s.seeds)]
        for model in s.models:
            lines.append(f"| {model} | " + " | ".join(_cell(s.prompt_intervals[model][x]) for x in s.seeds) + " |")
    if provenance:
        lines += ["", "## Provenance", "", provenance]
    return "\n".join(lines) + "\n"


def _paired_row(model: str, c: Comparison) -> str:
    verdict = "significant" if c.significant else "n.s. (not significant)"
    return (f"| {model} | {c.mean_diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {c.wins} / {c.losses} / {c.ties} | "
            f"{c.sign_test_p:.2g} | {verdict} |")


def _curve_section(s: Summary, model: str, points: list[CurvePoint]) -> list[str]:
    """The best-of-n curve's table: a row per n, its rewards, KL bound, sampling cost and paired test."""
    big = s.curve_samples[model]
    lines = ["", f"## Best-of-n from {model}, n = {', '.join(str(p.n) for p in points)}", "",
             f"One draw of {big} samples per prompt and seed; each n is the unbiased estimate over every n-subset of "
             f"the {big} (Nakano et al. 2021), not the first n. KL bound: log n - (n-1)/n nats (Beirami et al. 2024). "
             f"Cost of a point: n x {s.n_prompts} episodes and the tokens of n samples, mean over seeds.", "",
             "| n | gold_reward | reward | KL bound | episodes | tokens | " + f"gold vs {s.baseline}, paired |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        iv = p.intervals
        pair = "—" if p.paired is None else (f"{p.paired.mean_diff:+.3f} [{p.paired.low:+.3f}, {p.paired.high:+.3f}]"
                                             + ("" if p.paired.significant else ", n.s."))
        lines.append(f"| {p.n} | {_cell(iv.get('gold_reward'))} | {_cell(iv.get('reward'))} | "
                     f"{iv['kl_bound'].mean:.3f} | {iv['compute/episodes'].mean:,.0f} | "
                     f"{iv['compute/tokens_generated'].mean:,.0f} | {pair} |")
    return lines


def frontier_plot(s: Summary, out: Path) -> Path | None:
    """Gold reward against KL to the reference, every model with its 95% intervals over seeds (the
    over-optimisation frontier, Gao et al. 2022)."""
    # best-of-n has no sampled KL: it is placed at its analytic bound, log n - (n-1)/n, and says so
    pts = [(m, s.intervals[m].get("kl_to_reference") or s.intervals[m].get("kl_bound"), s.intervals[m].get("gold_reward"),
            "kl_to_reference" not in s.intervals[m]) for m in s.models]
    pts = [(m, kl, g, bound) for m, kl, g, bound in pts if kl is not None and g is not None]
    curves = _gold_curves(s)
    if not pts and not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for m, kl, g, bound in pts:
        ax.errorbar(kl.mean, g.mean, xerr=[[kl.mean - kl.low], [kl.high - kl.mean]],
                    yerr=[[g.mean - g.low], [g.high - g.mean]], fmt="^" if bound else "o", capsize=3,
                    label=f"{m} (KL bound)" if bound else m)
    for m, points in curves.items():
        _curve_line(ax, m, points, "kl_bound")
    ax.set(xlabel="KL(model || SFT), nats", ylabel="gold reward (greedy; best-of-n: the kept sample)",
           title=f"Gold reward vs KL, mean and 95% CI over {len(s.seeds)} seeds")
    # beside the axes: with a dozen entries, inside it hides the points
    return _save(fig, ax, out / "gold_vs_kl.png", loc="upper left", bbox_to_anchor=(1.01, 1))


COMPUTE_AXES = (("episode", "compute/episodes", "episodes (responses sampled)"),
                ("tokens_generated", "compute/tokens_generated", "response tokens generated"),
                ("train_time", None, "training wall time (s)"))
"""The x axes of the matched-compute plot: the key in an RL stage's eval rows, the key of a
best-of-n point's cost (None: not drawn; a best-of-n point's wall time includes SFT's), the label."""
REWARD_AXES = (("eval/gold_reward", "gold_reward", "greedy gold reward"),
               ("eval/reward", "reward", "greedy learned reward"))


def curves_plot(runs: list[SeedRun], out: Path, s: Summary | None = None) -> Path | None:
    """Matched compute: greedy gold and learned reward on the eval prompts (rows) against episodes,
    generated tokens and training wall time (columns), from step 0 (the SFT point), for every RL
    stage: the mean over seeds and the band from the lowest to the highest seed. Beside them, each
    best-of-n curve of `s` at its sampling cost, with its 95% intervals over seeds."""
    import numpy as np

    series: dict[str, list[list[dict[str, Any]]]] = {}
    for run in runs:
        for stage in run.summaries:
            rows = [r for r in _metrics(run.root / stage / "metrics.jsonl") if "eval/gold_reward" in r]
            if rows:
                series.setdefault(stage, []).append(rows)
    curves = _gold_curves(s) if s is not None else {}
    if not series and not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7))
    axes = fig.subplots(len(REWARD_AXES), len(COMPUTE_AXES), squeeze=False)
    color = {name: f"C{i % 10}" for i, name in enumerate([*curves, *series])}  # one colour per line in every panel
    for r, (y_key, y_point, y_label) in enumerate(REWARD_AXES):
        for c, (x_key, x_point, x_label) in enumerate(COMPUTE_AXES):
            ax = axes[r][c]
            if x_point is not None:
                for m, points in curves.items():  # its sampling cost, drawn at eval time
                    if y_point in points[0].intervals and x_point in points[0].intervals:
                        _curve_line(ax, m, points, x_point, y_point, color=color[m])
            for stage, per_seed in series.items():
                if not all(x_key in row and y_key in row for rows in per_seed for row in rows):
                    continue  # a run from before the key was logged
                n = min(len(rows) for rows in per_seed)
                # Episodes and tokens are the same at every seed up to dynamic sampling; wall time is not.
                x = np.array([[row[x_key] for row in rows[:n]] for rows in per_seed], dtype=float).mean(0)
                y = np.array([[row[y_key] for row in rows[:n]] for rows in per_seed], dtype=float)
                ax.plot(x, y.mean(0), label=f"sft+{stage}", color=color[stage])
                ax.fill_between(x, y.min(0), y.max(0), alpha=0.15, color=color[stage])
            ax.set(xlabel=x_label, ylabel=y_label)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Reward at matched compute, {len(runs)} seeds (bands: min-max over seeds; "
                 "best-of-n: 95% intervals; wall time: RL stages only)")
    fig.tight_layout()
    fig.savefig(out / "matched_compute.png", dpi=110)
    return out / "matched_compute.png"


def _gold_curves(s: Summary) -> dict[str, list[CurvePoint]]:
    """The best-of-n curves that have a gold reward to plot."""
    return {m: points for m, points in s.curves.items() if points and "gold_reward" in points[0].intervals}


def _curve_line(ax: Any, model: str, points: list[CurvePoint], x_key: str, y_key: str = "gold_reward",
                color: str | None = None) -> None:
    """A best-of-n curve: `y_key` against `x_key` (kl_bound or a compute/ key), 95% intervals over seeds."""
    x = [p.intervals[x_key].mean for p in points]
    g = [p.intervals[y_key] for p in points]
    ax.errorbar(x, [i.mean for i in g], yerr=[[i.mean - i.low for i in g], [i.high - i.mean for i in g]], fmt="s--",
                capsize=3, color=color, label=f"{model} best-of-n (n = {', '.join(str(p.n) for p in points)})"
                + (", KL bound" if x_key == "kl_bound" else ""))
    for xi, p in zip(x, points):
        ax.annotate(f"n={p.n}", (xi, p.intervals[y_key].mean), xytext=(4, -10), textcoords="offset points",
                    fontsize=7)


WIN_COLORS = {"wins": "#2ca02c", "ties": "#bbbbbb", "losses": "#d62728"}


def win_rate_plot(s: Summary, out: Path) -> Path | None:
    """Each model against the baseline, per prompt and seed: the shares of wins, ties and losses as
    stacked horizontal bars, one panel for the gold reward and one for the learned reward. Beside
    each bar its paired mean difference and 95% interval; a non-significant one is hatched and
    marked 'n.s.' (the rule of `paired_difference`)."""
    panels = [(title, c) for title, c in (("gold reward", s.paired), ("learned reward", s.paired_reward)) if c]
    if not panels:
        return None
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    models = list(panels[0][1])
    fig = Figure(figsize=(5.2 * len(panels), 0.45 * len(models) + 1.6))
    axes = fig.subplots(ncols=len(panels), squeeze=False)[0]
    for ax, (title, comparisons) in zip(axes, panels):
        for row, model in enumerate(models):
            c = comparisons[model]
            total = c.wins + c.ties + c.losses
            left = 0.0
            for kind in ("wins", "ties", "losses"):
                share = getattr(c, kind) / total
                ax.barh(row, share, left=left, color=WIN_COLORS[kind], hatch=None if c.significant else "//",
                        edgecolor="white")
                left += share
            note = f"{c.mean_diff:+.2f} [{c.low:+.2f}, {c.high:+.2f}]" + ("" if c.significant else " n.s.")
            ax.text(1.03, row, note, va="center", fontsize=7)
        ax.set_yticks(range(len(models)), [m if comparisons[m].significant else f"{m} (n.s.)" for m in models],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1.6), xticks=[0, 0.25, 0.5, 0.75, 1], xlabel="share of prompt-seed pairs",
               title=f"vs {s.baseline}: {title} (right: mean difference [95% CI])")
        ax.title.set_fontsize(8)
    fig.suptitle(f"Wins / ties / losses per prompt and seed, {len(s.seeds)} seeds; hatched, n.s. = not significant",
                 fontsize=9)
    return _save(fig, axes[0], out / "win_rates.png", handles=[Patch(color=c, label=k) for k, c in WIN_COLORS.items()],
                 loc="lower left", bbox_to_anchor=(0, 1.12), ncols=3, frameon=False)


def _save(fig: Any, ax: Any, path: Path, **legend: Any) -> Path:
    ax.legend(fontsize=8, **legend)
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
    plots = [p for p in (frontier_plot(summary, out), curves_plot(runs, out, summary), win_rate_plot(summary, out))
             if p is not None]
    if plots:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    from align.rundir import atomic_write_text

    atomic_write_text(out / "multiseed.md", text)
    return {"summary": summary, "values": values(runs), "report": out / "multiseed.md", "text": text}
