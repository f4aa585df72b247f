"""`align compare`: one report that puts the evaluated models side by side.

Reads what `align eval` wrote (`results.json` and `responses/<name>.jsonl`) and, through each
model's path, its run directory (`metrics.jsonl` of a PPO run). Writes into the output directory:

    table (in both reports)   a row per model: every eval metric, win-rates against the baseline,
                              and the compute spent along the chain of runs that produced it
    training_curves.png       PPO objective/scores and objective/kl against step
    reward_kl_frontier.png    each model at (KL to reference, reward), PPO training trajectories behind
    gold_vs_learned.png       PPO's periodic eval: learned and gold reward against step
    report.md                 the table, win-rates, plots and the first prompts' responses
    report.html               the same, self-contained (images inlined, every text escaped)

A plot whose data is absent is skipped and the report says why.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from align.errors import AlignError
from align.rundir import atomic_write_text, read_metrics

# (key, column header, what it measures). Metrics not listed here still get a column, after these.
METRICS: list[tuple[str, str, str]] = [
    ("reward", "reward", "mean learned reward of the greedy response"),
    ("gold_reward", "gold reward", "mean gold reward of the greedy response (never used in training)"),
    ("kl_to_reference", "KL to ref", "KL(model || reference) in nats per response, on one sample per prompt"),
    ("sampled_reward", "reward (sampled)", "mean learned reward of a sampled response"),
    ("sampled_gold_reward", "gold (sampled)", "mean gold reward of a sampled response"),
    ("response_length", "length", "mean greedy response length in tokens, EOS included"),
    ("eos_rate", "EOS rate", "share of greedy responses that end with EOS"),
    ("val_loss", "val loss", "NLL per response token on the SFT validation set"),
    ("perplexity", "perplexity", "exp(val loss)"),
    ("token_accuracy", "token acc.", "argmax accuracy on the SFT validation responses"),
]
COMPUTE: list[tuple[str, str]] = [
    ("wall_time_sec", "wall time (s)"),
    ("tokens", "tokens"),
    ("episodes", "episodes"),
    ("peak_memory_mb", "peak mem (MB)"),
    ("stages", "stages"),
]
PLOTS: dict[str, tuple[str, str]] = {  # name: (title, caption)
    "training_curves": ("PPO training curves",
                        "Mean reward-model score and KL to the reference of each step's sampled rollouts."),
    "reward_kl_frontier": ("Reward vs KL frontier",
                           "Points: each model's greedy responses on the held-out prompts. Faded lines: "
                           "PPO's sampled training rollouts step by step, so their level can differ from "
                           "the points'; the shape shows how much KL each gain in reward cost."),
    "gold_vs_learned": ("Gold vs learned reward over PPO steps",
                        "PPO's periodic eval. A learned reward that keeps rising while the gold reward "
                        "stalls or falls is over-optimisation of the reward model."),
}
FIGSIZE = (7.0, 4.5)
DPI = 110


@dataclass
class Model:
    """One evaluated model, as `align eval` recorded it."""

    name: str
    metrics: dict[str, float]
    compute: dict[str, Any]
    responses: list[dict[str, Any]]
    """Per prompt, in the eval's prompt order: prompt, response, reward?, gold_reward?, ..."""
    training: list[dict[str, Any]]
    """The metrics.jsonl rows of the run that produced the model; empty if it cannot be found."""

    @property
    def is_ppo(self) -> bool:
        return any("objective/scores" in r for r in self.training)


# ----------------------------------------------------------------------------------------------
# Win-rate (pure)


def outcomes(scores: Sequence[float], baseline: Sequence[float], tol: float = 1e-6) -> tuple[int, int, int]:
    """(wins, ties, losses) of `scores` against `baseline`, prompt by prompt.

    Scores within `tol` (relative or absolute) tie: the same response scored in a differently padded
    batch can differ in its last bits, and identical responses must tie."""
    if len(scores) != len(baseline):
        raise ValueError(f"{len(scores)} scores against {len(baseline)} baseline scores")
    wins = ties = 0
    for a, b in zip(scores, baseline):
        if math.isclose(a, b, rel_tol=tol, abs_tol=tol):
            ties += 1
        elif a > b:
            wins += 1
    return wins, ties, len(scores) - wins - ties


def win_rate(scores: Sequence[float], baseline: Sequence[float], tol: float = 1e-6) -> float:
    """Mean over prompts of win = 1, tie = 0.5, loss = 0; a model against itself scores 0.5."""
    wins, ties, _ = outcomes(scores, baseline, tol)
    return (wins + 0.5 * ties) / len(scores) if scores else math.nan


def pairwise(model: Model, baseline: Model, key: str) -> tuple[float, tuple[int, int, int]] | None:
    """Win-rate of `model` against `baseline` under the per-prompt score `key`, or None when the two
    were not scored on the same prompts (in the same order) or lack the score."""
    if [r["prompt"] for r in model.responses] != [r["prompt"] for r in baseline.responses]:
        return None
    a = [r.get(key) for r in model.responses]
    b = [r.get(key) for r in baseline.responses]
    if not a or None in a or None in b:
        return None
    return win_rate(a, b), outcomes(a, b)


# ----------------------------------------------------------------------------------------------
# Loading


def find_results(path: str | Path) -> Path:
    """`results.json` of an eval output dir, of a pipeline root (`<root>/eval/results.json`), or the file itself."""
    p = Path(path)
    for candidate in (p / "results.json", p / "eval" / "results.json"):
        if candidate.is_file():
            return candidate
    if p.is_file() and p.suffix == ".json":
        return p
    raise AlignError(f"{path}: no results.json here or in {p / 'eval'}; run `align eval` first")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AlignError(f"{path}: cannot read JSON: {e}") from None
    except RecursionError:
        raise AlignError(f"{path}: cannot read JSON: nested too deeply") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Responses, one JSON object per prompt; strict, since a lost line would shift every prompt after it.
    Texts must be strings and scores numbers (or null), or the line is named."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AlignError(f"{path}: cannot read: {e}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}:{i}: not JSON: {e.msg}") from None
        except RecursionError:
            raise AlignError(f"{path}:{i}: JSON nested too deeply to read") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise AlignError(f"{path}:{i}: expected an object with a 'prompt' field")
        for key, kind in RESPONSE_FIELDS.items():
            if key in row and not _is(row[key], kind, optional=key != "prompt"):
                raise AlignError(f"{path}:{i}: field '{key}' must be {KIND_NAMES[kind]}, got "
                                 f"{type(row[key]).__name__}; rerun `align eval`")
        rows.append(row)
    return rows


# What compare reads from align eval's files, and the type each must have (None is allowed for
# every number: a non-finite value is written as null).
RESPONSE_FIELDS = {"prompt": "text", "response": "text", "sampled_response": "text", "reward": "number",
                   "gold_reward": "number", "sampled_reward": "number", "sampled_gold_reward": "number"}
COMPUTE_FIELDS = {"wall_time_sec": "number", "tokens": "number", "episodes": "number", "peak_memory_mb": "number",
                  "tokens_generated": "number", "stages": "texts"}
KIND_NAMES = {"text": "a string", "number": "a number", "texts": "a list of strings", "mapping": "an object",
              "list": "a list"}


def _is(value: Any, kind: str, optional: bool = True) -> bool:
    if value is None:
        return optional
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "texts":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, {"text": str, "mapping": dict, "list": list}[kind])


def check_results(path: Path, results: dict[str, Any]) -> None:
    """The shape of a results.json, as `align eval` writes it: an error naming the file and the key
    of the first value of the wrong type (a metric that is a string, `models` not a list, ...)."""
    def need(value: Any, kind: str, key: str, optional: bool = True) -> None:
        if not _is(value, kind, optional):
            got = "nothing" if value is None else type(value).__name__
            raise AlignError(f"{path}: key '{key}' must be {KIND_NAMES[kind]}, got {got}; "
                             "rerun `align eval` to rewrite it")

    need(results.get("models"), "list", "models")
    need(results.get("baseline"), "text", "baseline")
    for i, entry in enumerate(results.get("models") or []):
        need(entry, "mapping", f"models[{i}]", optional=False)
        need(entry.get("name"), "text", f"models[{i}].name", optional=False)
        need(entry.get("responses"), "text", f"models[{i}].responses", optional=False)
        need(entry.get("path"), "text", f"models[{i}].path")
        need(entry.get("metrics"), "mapping", f"models[{i}].metrics")
        for key, value in (entry.get("metrics") or {}).items():
            need(value, "number", f"models[{i}].metrics.{key}")
        need(entry.get("compute"), "mapping", f"models[{i}].compute")
        for key, kind in COMPUTE_FIELDS.items():
            need((entry.get("compute") or {}).get(key), kind, f"models[{i}].compute.{key}")


def locate(path: str, results_dir: Path) -> Path | None:
    """A path recorded by `align eval`, which is relative to the directory eval ran in: tried
    beside results.json and up its parents first (the pipeline that wrote it), then the cwd."""
    p = Path(path)
    if p.is_absolute():
        return p if p.exists() else None
    for base in [results_dir, *results_dir.parents, Path.cwd()]:
        if (base / p).exists():
            return base / p
    return None


def load_models(results_path: Path, results: dict[str, Any]) -> list[Model]:
    check_results(results_path, results)
    models = []
    for entry in results.get("models") or []:
        name, rel = entry["name"], entry["responses"]
        responses_path = results_path.parent / rel
        if not responses_path.is_file():
            raise AlignError(f"{responses_path}: responses of model '{name}' are missing")
        responses = read_jsonl(responses_path)
        model_path = locate(entry["path"], results_path.parent) if entry.get("path") else None
        training = []
        if model_path is not None:
            run_dir = model_path.parent if model_path.name == "model" else model_path
            if (run_dir / "metrics.jsonl").is_file():
                training = read_metrics(run_dir / "metrics.jsonl")
        models.append(Model(name, entry.get("metrics") or {}, entry.get("compute") or {}, responses, training))
    if not models:
        raise AlignError(f"{results_path}: holds no models")
    return models


def load_all(paths: Sequence[str | Path]) -> tuple[list[Path], list[Model], str]:
    """Every model of every input, the first input's baseline name. A name seen in an earlier input
    gets the input's directory name appended, so rows stay distinct."""
    if not paths:
        raise AlignError("give at least one eval directory or pipeline root")
    sources, models, baseline = [], [], None
    for path in paths:
        results_path = find_results(path)
        results = read_json(results_path)
        if not isinstance(results, dict):
            raise AlignError(f"{results_path}: expected a JSON object as written by `align eval`")
        loaded = load_models(results_path, results)
        if baseline is None:
            baseline = results.get("baseline") or loaded[0].name
        taken = {m.name for m in models}
        label = results_path.parent.parent.name if results_path.parent.name == "eval" else results_path.parent.name
        for m in loaded:
            if m.name in taken:
                m.name = f"{m.name} ({label})"
        sources.append(results_path.resolve())
        models.extend(loaded)
    assert baseline is not None
    if baseline not in {m.name for m in models}:
        raise AlignError(f"{sources[0]}: baseline '{baseline}' is not among its models")
    return sources, models, baseline


# ----------------------------------------------------------------------------------------------
# Table


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    notes: list[tuple[str, str]]
    """(header, meaning) for the report's column legend."""


def fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key == "stages":
        return " → ".join(value) if value else "—"
    if key in ("tokens", "episodes"):
        return f"{int(value):,}"
    if key == "wall_time_sec":
        return f"{value:.1f}"
    if key == "peak_memory_mb":
        return f"{value:.0f}"
    if key.startswith("win_"):
        return f"{value:.2f}"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def build_table(models: list[Model], baseline: str,
                wins: dict[str, dict[str, tuple[float, tuple[int, int, int]] | None]]) -> Table:
    known = [m for m, _, _ in METRICS]
    present = {k for m in models for k in m.metrics}
    extra = sorted(present - set(known))
    metric_cols = [(k, h, d) for k, h, d in METRICS if k in present] + [(k, k, "") for k in extra]
    win_cols = [(f"win_{k}", f"win vs {baseline} ({short})",
                 f"share of prompts where the model's {label} beats {baseline}'s (tie = 1/2); "
                 f"{baseline}'s own is 1/2 by definition, shown as —")
                for k, short, label in (("reward", "reward", "learned reward"), ("gold_reward", "gold", "gold reward"))
                if any(wins[m.name].get(k) for m in models)]
    compute_cols = [(k, h, "") for k, h in COMPUTE if any(k in m.compute for m in models)]
    cols = metric_cols + win_cols + compute_cols
    rows = []
    for m in models:
        cells = [m.name]
        for key, _, _ in cols:
            if key.startswith("win_"):
                pair = wins[m.name].get(key[4:])
                cells.append(fmt(pair[0] if pair else None, key))
            else:
                cells.append(fmt((m.compute if key in dict(COMPUTE) else m.metrics).get(key), key))
        rows.append(cells)
    notes = [(h, d) for _, h, d in metric_cols + win_cols if d]
    notes.append(("compute", "summed along the chain of runs that produced the model "
                             "(peak memory: the largest of them); stages: that chain"))
    return Table(["model"] + [h for _, h, _ in cols], rows, [False] + [k != "stages" for k, _, _ in cols], notes)


def text_table(table: Table) -> str:
    """A plain-text table for the terminal: numbers right-aligned, text left-aligned."""
    widths = [max(len(c) for c in col) for col in zip(table.headers, *table.rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, table.numeric)).rstrip()

    return "\n".join([line(table.headers), "  ".join("-" * w for w in widths)] + [line(r) for r in table.rows])


# ----------------------------------------------------------------------------------------------
# Plots


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows that hold a finite number for it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
           and isinstance(r.get("step"), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def new_figure(**subplots: Any) -> tuple[Any, Any]:
    # Figure without pyplot: no global state, no GUI backend, nothing to close.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, fig.subplots(**subplots)


def plot_training_curves(ppo: list[tuple[Model, str]]) -> Any:
    fig, (ax_s, ax_kl) = new_figure(ncols=2)
    for m, color in ppo:
        ax_s.plot(*series(m.training, "objective/scores"), color=color, marker=".", label=m.name)
        ax_kl.plot(*series(m.training, "objective/kl"), color=color, marker=".", label=m.name)
    ax_s.set(title="Reward-model score of rollouts", xlabel="PPO step", ylabel="objective/scores")
    ax_kl.set(title="KL to reference", xlabel="PPO step", ylabel="objective/kl (nats)")
    for ax in (ax_s, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PPO training curves")
    return fig


def plot_frontier(points: list[tuple[Model, str]], ppo: list[tuple[Model, str]]) -> Any:
    fig, ax = new_figure()
    for m, color in ppo:
        kl, scores = series(m.training, "objective/kl")[1], series(m.training, "objective/scores")[1]
        if kl and len(kl) == len(scores):
            ax.plot(kl, scores, color=color, alpha=0.35, marker=".", label=f"{m.name}: training (rollouts)")
            steps = series(m.training, "objective/kl")[0]
            for i in (0, -1):
                ax.annotate(f"step {steps[i]}", (kl[i], scores[i]), color=color, fontsize=8,
                            xytext=(4, -11), textcoords="offset points")
    for m, color in points:
        x, y = m.metrics["kl_to_reference"], m.metrics["reward"]
        ax.scatter([x], [y], color=color, s=60, zorder=3, edgecolor="black", label=f"{m.name}: eval")
        ax.annotate(m.name, (x, y), xytext=(6, 6), textcoords="offset points", fontweight="bold")
    ax.set(title="Reward vs KL to reference", xlabel="KL(model || reference), nats", ylabel="learned reward")
    ax.margins(0.1)  # room for the labels beside the outermost points
    ax.grid(alpha=0.3)
    # Below the axes: inside, it hides the point labels, which the legend placement cannot see.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False)
    return fig


def plot_gold_vs_learned(ppo: list[tuple[Model, str]]) -> Any:
    fig, ax = new_figure()
    ax_gold = ax.twinx()  # the two rewards live on unrelated scales
    handles = []
    for m, color in ppo:
        handles += ax.plot(*series(m.training, "eval/reward"), color=color, marker="o", label=f"{m.name}: learned")
        steps, gold = series(m.training, "eval/gold_reward")
        if steps:
            handles += ax_gold.plot(steps, gold, color=color, marker="s", linestyle="--", label=f"{m.name}: gold")
    title = "Gold vs learned reward during PPO (periodic eval)"
    if not ax_gold.lines:
        title += "\nno gold reward was logged: learned reward only"
    ax.set(title=title, xlabel="PPO step", ylabel="learned reward (solid)")
    ax_gold.set_ylabel("gold reward (dashed)")
    gold_values = [y for line in ax_gold.lines for y in line.get_ydata()]
    if gold_values and all(0 <= y <= 1 for y in gold_values):
        ax_gold.set_ylim(-0.05, 1.05)  # a 0/1 gold reward is an accuracy: show it on its whole range
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize=8)
    return fig


def make_plots(models: list[Model]) -> tuple[dict[str, Any], dict[str, str]]:
    """Figures by plot name, and the reason for each plot skipped."""
    colors = {m.name: colormaps["tab10"](i % 10) for i, m in enumerate(models)}
    ppo = [(m, colors[m.name]) for m in models if m.is_ppo]
    points = [(m, colors[m.name]) for m in models if "kl_to_reference" in m.metrics and "reward" in m.metrics]
    with_eval = [(m, c) for m, c in ppo if series(m.training, "eval/reward")[0]]
    figures, skipped = {}, {}
    if ppo:
        figures["training_curves"] = plot_training_curves(ppo)
    else:
        skipped["training_curves"] = "no PPO run (metrics.jsonl with objective/scores) among the models' run dirs"
    if points or ppo:
        figures["reward_kl_frontier"] = plot_frontier(points, ppo)
    else:
        skipped["reward_kl_frontier"] = "no model has both reward and kl_to_reference, and no PPO run was found"
    if with_eval:
        figures["gold_vs_learned"] = plot_gold_vs_learned(with_eval)
    else:
        skipped["gold_vs_learned"] = "no PPO run logged eval rows (eval/reward)"
    return figures, skipped


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Reports


def score_note(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    parts = [f"{label} {row[k]:.3g}" for k, label in (("reward", "reward"), ("gold_reward", "gold"))
             if isinstance(row.get(k), (int, float))]
    return " · ".join(parts)


def sample_rows(models: list[Model], baseline: Model, n: int) -> list[tuple[str, list[dict[str, Any] | None]]]:
    """The baseline's first `n` prompts, each with every model's response row to the same prompt
    (by position when the prompt lists agree, else by prompt text; None when a model lacks it)."""
    out = []
    for i, base_row in enumerate(baseline.responses[:n]):
        prompt = base_row["prompt"]
        cells = []
        for m in models:
            if i < len(m.responses) and m.responses[i]["prompt"] == prompt:
                cells.append(m.responses[i])
            else:
                cells.append(next((r for r in m.responses if r["prompt"] == prompt), None))
        out.append((prompt, cells))
    return out


def win_summary(pair: tuple[float, tuple[int, int, int]] | None, is_baseline: bool) -> str:
    if is_baseline:
        return "baseline"
    if pair is None:
        return "n/a"
    rate, (w, t, l) = pair
    return f"{rate:.2f} ({w} W / {t} T / {l} L)"


@dataclass
class Report:
    """Everything both report formats show, already computed."""

    sources: list[Path]
    baseline: str
    n_prompts: int
    table: Table
    wins: list[tuple[str, str, str]]
    """(model, vs baseline under reward, under gold) per model."""
    plots: dict[str, bytes]
    skipped: dict[str, str]
    samples: list[tuple[str, list[dict[str, Any] | None]]]
    names: list[str]


def md_cell(text: str) -> str:
    # Markdown renders raw HTML, and responses are model output: escape, then protect the table.
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or "∅"


def source_name(source: Path) -> str:
    """A results file as a report names it: its run and eval directory (`addition/eval`), never the
    machine's absolute path."""
    return "/".join(source.parts[-3:-1])


def render_markdown(r: Report) -> str:
    lines = ["# align comparison report", "",
             f"Sources: {', '.join(f'`{source_name(s)}`' for s in r.sources)}. Baseline: **{r.baseline}**; "
             f"{r.n_prompts} held-out prompts, greedy responses.", "", "## Results", ""]
    lines.append("| " + " | ".join(md_cell(h) for h in r.table.headers) + " |")
    lines.append("|" + "|".join("---:" if num else "---" for num in r.table.numeric) + "|")
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in r.table.rows]
    lines += [""] + [f"- **{h}**: {d}" for h, d in r.table.notes]
    lines += ["", f"## Win-rates against {r.baseline}", "",
              "Per prompt: win 1, tie ½, loss 0, averaged over the prompts; W/T/L are the counts.", "",
              "| model | learned reward | gold reward |", "|---|---:|---:|"]
    lines += [f"| {md_cell(name)} | {a} | {b} |" for name, a, b in r.wins]
    lines += ["", "## Plots", ""]
    for name, (title, caption) in PLOTS.items():
        lines.append(f"### {title}")
        lines.append("")
        if name in r.plots:
            lines += [f"![{title}]({name}.png)", "", caption]
        else:
            lines.append(f"_Skipped: {r.skipped[name]}._")
        lines.append("")
    lines += ["## Samples", "", f"The first {len(r.samples)} prompts, every model's greedy response.", "",
              "| prompt | " + " | ".join(md_cell(n) for n in r.names) + " |",
              "|---|" + "---|" * len(r.names)]
    for prompt, cells in r.samples:
        shown = [md_cell(c.get("response", "")) + (f"<br><sub>{score_note(c)}</sub>" if score_note(c) else "")
                 if c else "—" for c in cells]
        lines.append(f"| {md_cell(prompt)} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 9px; vertical-align: top; }
th { background: #f3f4f6; text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.results td { white-space: nowrap; }
table.samples td { max-width: 30em; }
.wide { overflow-x: auto; }
pre.text { margin: 0; white-space: pre-wrap; word-break: break-word; font-size: 13px; }
.score { color: #666; font-size: 12px; }
.note { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f4f6; padding: 0 3px; }
"""


def render_html(r: Report) -> str:
    e = html.escape
    t = r.table

    def row(cells: list[str], tag: str = "td") -> str:
        return "<tr>" + "".join(f'<{tag}{" class=num" if num and tag == "td" else ""}>{e(c)}</{tag}>'
                                for c, num in zip(cells, t.numeric)) + "</tr>"

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>align comparison report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>align comparison report</h1>",
             f"<p>Sources: {', '.join(f'<code>{e(source_name(s))}</code>' for s in r.sources)}. "
             f"Baseline: <b>{e(r.baseline)}</b>; {r.n_prompts} held-out prompts, greedy responses.</p>",
             "<h2>Results</h2>", '<div class="wide"><table class="results">', row(t.headers, "th"),
             *[row(cells) for cells in t.rows], "</table></div><ul>",
             *[f"<li><b>{e(h)}</b>: {e(d)}</li>" for h, d in t.notes], "</ul>",
             f"<h2>Win-rates against {e(r.baseline)}</h2>",
             "<p>Per prompt: win 1, tie ½, loss 0, averaged over the prompts; W/T/L are the counts.</p>",
             "<table><tr><th>model</th><th>learned reward</th><th>gold reward</th></tr>",
             *[f'<tr><td>{e(n)}</td><td class="num">{e(a)}</td><td class="num">{e(b)}</td></tr>'
               for n, a, b in r.wins], "</table>", "<h2>Plots</h2>"]
    for name, (title, caption) in PLOTS.items():
        parts.append(f"<h3>{e(title)}</h3>")
        if name in r.plots:
            data = base64.b64encode(r.plots[name]).decode("ascii")
            parts.append(f'<img alt="{e(title)}" src="data:image/png;base64,{data}"><p>{e(caption)}</p>')
        else:
            parts.append(f'<p class="note">Skipped: {e(r.skipped[name])}.</p>')
    parts += ["<h2>Samples</h2>", f"<p>The first {len(r.samples)} prompts, every model's greedy response.</p>",
              '<div class="wide"><table class="samples"><tr><th>prompt</th>'
              + "".join(f"<th>{e(n)}</th>" for n in r.names) + "</tr>"]
    for prompt, cells in r.samples:
        tds = []
        for c in cells:
            if c is None:
                tds.append("<td>—</td>")
                continue
            note = score_note(c)
            tds.append(f'<td><pre class="text">{e(c.get("response", "")) or "∅"}</pre>'
                       + (f'<div class="score">{e(note)}</div>' if note else "") + "</td>")
        parts.append(f'<tr><td><pre class="text">{e(prompt)}</pre></td>{"".join(tds)}</tr>')
    parts += ["</table></div>", "</body></html>"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry point


def default_out(paths: Sequence[str | Path]) -> Path:
    """`report/` beside the first input's eval directory: `<root>/report` for a pipeline root."""
    return find_results(paths[0]).parent.parent / "report"


def compare(paths: Sequence[str | Path], out: str | Path | None = None, samples: int = 8) -> dict[str, Any]:
    """Build the report for the models evaluated at `paths`; write it to `out` (default: see
    `default_out`). Returns the table (headers, rows, plain text), win-rates, plot paths, the plots
    skipped with the reason, and the report paths."""
    sources, models, baseline = load_all(paths)
    out = Path(out) if out is not None else default_out(paths)
    base = next(m for m in models if m.name == baseline)
    wins = {m.name: {k: None if m is base else pairwise(m, base, k) for k in ("reward", "gold_reward")} for m in models}
    table = build_table(models, baseline, wins)
    figures, skipped = make_plots(models)
    plots = {name: png_bytes(fig) for name, fig in figures.items()}
    report = Report(sources, baseline, len(base.responses), table,
                    [(m.name, win_summary(wins[m.name]["reward"], m is base),
                      win_summary(wins[m.name]["gold_reward"], m is base)) for m in models],
                    plots, skipped, sample_rows(models, base, samples), [m.name for m in models])
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            if name in plots:
                (out / f"{name}.png").write_bytes(plots[name])
            else:
                (out / f"{name}.png").unlink(missing_ok=True)  # a previous report's plot would mislead
        atomic_write_text(out / "report.md", render_markdown(report))
        atomic_write_text(out / "report.html", render_html(report))
    except OSError as e:
        raise AlignError(f"{out}: cannot write the report: {e.strerror}") from None
    return {"out": str(out), "baseline": baseline,
            "table": {"headers": table.headers, "rows": table.rows, "text": text_table(table)},
            "win_rates": {m: {k: (v[0] if v else None) for k, v in w.items()} for m, w in wins.items()},
            "plots": {name: str(out / f"{name}.png") for name in plots}, "skipped": skipped,
            "report_md": str(out / "report.md"), "report_html": str(out / "report.html")}
