"""Model cards: the `README.md` every `model/` directory gets, with YAML metadata as the Hugging Face
hub reads it (`library_name`, `base_model`, `tags`, `pipeline_tag`, `datasets`), then the chain of
stages and data that produced the model, its key hyper-parameters, its final metrics (from the
summary) and how to load it with plain transformers / peft.

`write_model_card` runs as part of finishing a run (`rundir.write_summary`, before summary.json),
so a complete run always has its card; `align export` writes one for the exported form. The card
names no machine path: local files by their name and content hash (inputs.json), local models by
their directory name, so a card can be pushed to the hub as it is. Imports no torch (the reward
snippet asks the tokenizer whether it adds BOS, through transformers, only for a reward model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.errors import AlignError
from align.rundir import CONFIG, INPUTS, PROVENANCE, SUMMARY, RunDir, atomic_write_text

CARD = "README.md"

HYPER_PARAMETERS = (
    "seed", "lora.r", "lora.alpha", "lora.target", "data.prompt_template", "data.max_length", "train.lr",
    "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.warmup_steps",
    "train.warmup_ratio", "margin", "beta", "loss_type", "memory_mode", "ppo.estimator", "ppo.lr",
    "ppo.total_episodes", "ppo.rollout_batch_size", "ppo.n_samples_per_prompt", "ppo.response_length",
    "ppo.temperature", "ppo.kl_coef", "ppo.kl_target", "ppo.clip_eps", "ppo.ppo_epochs",
)
"""The config keys a card lists, where the stage's config has them (`lora.*` only with LoRA on)."""

STAGE_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "dpo": ["dpo", "trl"]}
"""Hub tags by stage; every other stage is an online RL method (tagged `rlhf` and its name)."""

DATA_KEYS = ("data.train", "data.validation", "normalize_with", "eval.prompts")

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def is_hub_id(value: Any) -> bool:
    """Whether `value` names something on the hub (`gpt2`, `org/name`) rather than a local path:
    no such local path exists and it has the form of a repo id (not a data file name)."""
    return (isinstance(value, str) and bool(value) and not Path(value).expanduser().exists()
            and _HUB_ID.fullmatch(value) is not None and not value.endswith(_DATA_SUFFIXES))


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Link:
    """One stage of a model's lineage: its run directory's config, summary and input hashes."""

    root: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return str(self.summary.get("stage") or self.root.name)

    @classmethod
    def read(cls, root: Path, summary: dict[str, Any] | None = None) -> "Link":
        from align.runinfo import read_run_config

        return cls(root, read_run_config(root / CONFIG), summary if summary is not None else
                   _read_json(root / SUMMARY), _read_json(root / INPUTS))


def lineage(run: RunDir, summary: dict[str, Any]) -> tuple[list[Link], str | None]:
    """This run, then each earlier run its `model.path` came from, newest first; and the model the
    first stage started from (None when a run directory in the chain can no longer be read)."""
    chain = [Link.read(run.root, summary)]
    seen = {run.root.resolve()}
    while True:
        start = _get(chain[-1].config, "model.path")
        if not isinstance(start, str) or not start:
            return chain, None
        parent = RunDir.of(start)
        if not parent.config.is_file():
            return chain, start  # not one of our runs: the base model
        if parent.root.resolve() in seen or len(chain) >= 16:
            return chain, None
        seen.add(parent.root.resolve())
        try:
            chain.append(Link.read(parent.root))
        except AlignError:  # an earlier run's config was damaged since: the chain ends there
            return chain, None


def shown_model(value: str) -> str:
    """A model as a card names it: a hub id as it is, a run directory or local model by name."""
    if is_hub_id(value):
        return value
    p = Path(value)
    run = RunDir.of(p)
    return f"{run.root.name}/{p.name}" if run.root != p else p.name


def shown_data(value: str, link: Link, key: str) -> str:
    """A data source as a card names it: a hub dataset with its config and split, a local file by
    its name and the start of its sha256 (inputs.json)."""
    if is_hub_id(value):
        name = _get(link.config, "data.dataset_config") if key.startswith("data.") else None
        split_key = "data.validation_split" if key == "data.validation" else "data.split"
        split = _get(link.config, split_key) if key.startswith("data.") else None
        return f"`{value}`" + (f" (config `{name}`)" if name else "") + (f", split `{split}`" if split else "")
    digest = link.inputs.get(str(Path(value).absolute()))
    return f"`{Path(value).name}`" + (f" (sha256 {digest[:12]})" if digest else "")


def _model_form(model_dir: Path) -> str:
    """`adapter` (a LoRA adapter), `reward` (a sequence classifier) or `causal` (a causal LM)."""
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        return "adapter"
    architectures = _read_json(model_dir / "config.json").get("architectures") or []
    return "reward" if any(str(a).endswith("ForSequenceClassification") for a in architectures) else "causal"


def metadata(chain: list[Link], base: str | None, form: str) -> dict[str, Any]:
    """The card's YAML front matter."""
    stages = [link.stage for link in reversed(chain)]
    tags = ["align"]
    for stage in stages:
        for tag in STAGE_TAGS.get(stage, ["rlhf", stage]):
            if tag not in tags:
                tags.append(tag)
    if form == "adapter" or _get(chain[0].config, "lora.enabled"):
        tags += ["lora", "peft"] if form == "adapter" else ["lora"]
    datasets = []
    for link in chain:
        for key in ("data.train", "data.validation"):
            value = _get(link.config, key)
            if is_hub_id(value) and value not in datasets:
                datasets.append(value)
    out: dict[str, Any] = {"library_name": "peft" if form == "adapter" else "transformers"}
    if base is not None and is_hub_id(base):
        out["base_model"] = base
    out["tags"] = tags
    out["pipeline_tag"] = "text-classification" if form == "reward" else "text-generation"
    if datasets:
        out["datasets"] = datasets
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"`{value!r}`" if isinstance(value, (str, list)) else str(value)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def model_card(run: RunDir, summary: dict[str, Any], model_dir: Path | None = None, note: str = "") -> str:
    """The card of the model in `model_dir` (default `run.model`), produced by `run`."""
    model_dir = model_dir or run.model
    chain, base = lineage(run, summary)
    form = _model_form(model_dir)
    meta = metadata(chain, base, form)
    title = {"reward": "reward model", "adapter": "LoRA adapter", "causal": "causal LM"}[form]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {run.root.name}: {title} trained with align ({' → '.join(l.stage for l in reversed(chain))})", ""]
    if note:
        lines += [note, ""]
    lines += ["## Lineage", "",
              f"Base model: {f'`{shown_model(base)}`' if base else 'unknown (an earlier run directory is gone)'}.",
              "", "| stage | started from | data |", "| --- | --- | --- |"]
    for link in reversed(chain):
        start = _get(link.config, "model.path")
        data = [f"{key}: {shown_data(v, link, key)}" for key in DATA_KEYS
                if isinstance(v := _get(link.config, key), str) and v]
        for key in ("reward.model", "reward.function", "reference"):
            value = _get(link.config, key)
            if isinstance(value, str) and value:
                data.append(f"{key}: `{shown_model(value) if key != 'reward.function' else value}`")
        lines.append(f"| {link.stage} | `{shown_model(start) if isinstance(start, str) else '?'}` | "
                     f"{_markdown_cell('; '.join(data))} |")
    lines += ["", "## Hyper-parameters", "", "| stage | key | value |", "| --- | --- | --- |"]
    for link in reversed(chain):
        for key in HYPER_PARAMETERS:
            value = _get(link.config, key)
            if value is None or (key.startswith("lora.") and not _get(link.config, "lora.enabled")):
                continue
            lines.append(f"| {link.stage} | `{key}` | {_markdown_cell(_fmt(value))} |")
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += ["", "## Final metrics", "", f"From this run's `{SUMMARY}`.", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in metrics.items()]
    lines += ["", "## How to load it", ""] + loading_section(form, model_dir, chain[0])
    prov = _read_json(run.root / PROVENANCE)
    if prov:
        from align.provenance import provenance_text

        try:
            lines += ["", "## Provenance", "", provenance_text(prov)]
        except (KeyError, TypeError, AttributeError):  # a provenance.json from another version
            pass
    return "\n".join(lines).rstrip() + "\n"


def loading_section(form: str, model_dir: Path, link: Link) -> list[str]:
    template = _get(link.config, "data.prompt_template") or "{prompt}"
    if form == "reward":
        return ["A sequence classifier with one label: the score is its output at the last token of "
                "`[BOS] prompt response EOS` (the EOS appended to the response, BOS where the tokenizer adds "
                "one), the prompt wrapped in the template the model was trained with, and each part "
                "tokenized on its own, as align does. align's score then subtracts the normalisation offset "
                "of `align_reward.json` (`bias`) that the score head could not hold. This gives "
                "align's score (to float rounding):", "", "```python", reward_snippet(model_dir, template), "```", "",
                "For conversations (message lists), the input is "
                "`tokenizer.apply_chat_template(messages, tokenize=False)` tokenized without special tokens "
                "(the chat template closes the assistant turn), with no EOS appended."]
    if form == "adapter":
        config = _read_json(model_dir / "adapter_config.json")
        base = config.get("base_model_name_or_path")
        where = f"`{base}`" if is_hub_id(base) else (
            f"the local model `{shown_model(base)}`, at the path `adapter_config.json` records" if base else "unrecorded")
        return ["A LoRA adapter; its base model is " + where + ". `align export RUN OUT` writes it merged into "
                "the base (or the adapter alone, for a base on the hub).", "", "```python",
                "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                'path = "."  # this directory, or the hub repo id it was pushed to',
                "tokenizer = AutoTokenizer.from_pretrained(path)",
                "model = AutoPeftModelForCausalLM.from_pretrained(path)", "```", "",
                f"Prompts were wrapped in the template {template!r}."]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'path = "."  # this directory, or the hub repo id it was pushed to',
            "tokenizer = AutoTokenizer.from_pretrained(path)", "model = AutoModelForCausalLM.from_pretrained(path)",
            f"inputs = tokenizer({template!r}.format(prompt=\"...\"), return_tensors=\"pt\")",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64, do_sample=False)[0]))", "```", "",
            f"Prompts were wrapped in the template {template!r} (chat records: the tokenizer's chat template)."]


def reward_snippet(model_dir: Path, template: str) -> str:
    """Plain-transformers code that computes align's reward score for this model directory."""
    from transformers import AutoTokenizer

    saved = _read_json(model_dir / "align_reward.json")
    offset = float(saved.get("bias", 0.0))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with_special, without = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    adds_bos = len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id
    bos = "[tokenizer.bos_token_id] + " if adds_bos else ""
    return "\n".join([
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        'path = "."  # this directory, or the hub repo id it was pushed to',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
        f"OFFSET = {offset!r}  # align_reward.json: bias",
        "",
        "",
        "def reward(prompt: str, response: str) -> float:",
        f"    text = {template!r}.format(prompt=prompt)",
        f"    ids = {bos}tokenizer(text, add_special_tokens=False).input_ids",
        "    ids += tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]",
        "    with torch.no_grad():",
        "        return model(input_ids=torch.tensor([ids])).logits[0, 0].item() - OFFSET",
    ])


def write_model_card(run: RunDir, summary: dict[str, Any], model_dir: Path | None = None, note: str = "") -> None:
    """Write the card into `model_dir` (default `run.model`), atomically."""
    model_dir = model_dir or run.model
    atomic_write_text(model_dir / CARD, model_card(run, summary, model_dir, note))
