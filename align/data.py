"""Data: read records, render them to text segments, tokenize once with the loss mask, batch.

Formats (detected from the first record's keys, or set with `data.format`):
- alpaca `{instruction, input?, output}`; `{prompt, response}`; `{prompt, completion}`;
- chat `{messages: [{role, content}, ...]}`, rendered with the tokenizer's chat template, trained
  on assistant turns only;
- preference `{prompt, chosen, rejected}` (chosen/rejected may be strings or message lists).

A record becomes a list of `(text, trainable)` segments. Each segment is tokenized on its own and
the ids concatenated, so the prompt's ids are exactly the ids the policy is prompted with at
generation time (PPO), and the loss mask is built once, from segment lengths: never by searching
for token values.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from align.errors import AlignError, DataError

IGNORE_INDEX = -100
MAX_REPORTED_PROBLEMS = 10

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}
# Formats that carry a prompt but no response (PPO prompt sets). Alpaca without `output` and chat
# without a final assistant turn also serve as prompts.
PROMPT_FIELDS: dict[str, tuple[str, ...]] = {"chat": ("messages",), "alpaca": ("instruction",), "prompt": ("prompt",)}


@dataclass
class Record:
    """One data record and where it came from (`file:line`), for error messages."""

    where: str
    fields: dict[str, Any]


@dataclass
class Example:
    """A tokenized example: ids and the loss mask (1 = trained on), both of length T."""

    input_ids: list[int]
    loss_mask: list[int]


# ----------------------------------------------------------------------------------------------
# Reading


def read_records(source: str, split: str = "train", max_samples: int | None = None, dataset_config: str | None = None,
                 columns: dict[str, str] | None = None) -> list[Record]:
    """Read a .jsonl/.json/.csv/.parquet file, a dataset directory, or a hub dataset by name, then
    rename `columns` (`{field: column}`, see `map_columns`).

    JSON lines are parsed here, line by line, so a malformed line is reported by its line number
    (all bad lines of a file together); other formats go through `datasets`. A directory is a
    dataset saved with `save_to_disk`, or one `load_dataset` reads (data files, and a README.md
    whose `configs` name the configurations); `split` and `dataset_config` (`load_dataset`'s
    `name`) choose in it or in a hub dataset.
    """
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet") and not path.exists():
        raise AlignError(f"data file '{source}' does not exist")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        records = _read_json(path)
    elif path.is_file():
        records = _read_with_datasets(str(path), path.suffix.lstrip("."), split)
    elif path.is_dir():
        records = _read_dataset_dir(path, source, split, dataset_config)
    elif path.exists():
        raise AlignError(f"data path '{source}' is not a file or a directory")
    else:
        records = _read_hub(source, split, dataset_config)
    if not records:
        raise AlignError(f"{source}: no records")
    records = records[:max_samples] if max_samples else records
    return map_columns(records, columns, source) if columns else records


def map_columns(records: list[Record], columns: dict[str, str], source: str) -> list[Record]:
    """Rename each record's `columns[field]` to `field` (all at once, so a column may take the name
    another one had). LLaMA-Factory's alpaca names (`prompt`, `query`, `response`) become
    `instruction`, `input`, `output` when `query` is mapped. A column no record has is an error
    naming it, its config key and the columns there are; a record lacking a column another has is
    reported with its location (alpaca's optional `input` may be absent)."""
    from align.config import LLAMA_FACTORY_COLUMNS

    names = {(LLAMA_FACTORY_COLUMNS.get(f, f) if "query" in columns else f): (f, c) for f, c in columns.items()}
    for field, (given, column) in names.items():
        if all(column not in r.fields for r in records):
            raise AlignError(f"{source}: column '{column}' (config key 'data.columns.{given}') is not in the data; its "
                             f"columns are {', '.join(map(str, records[0].fields)) or 'none'}")
    problems = [f"{r.where}: column '{column}' (config key 'data.columns.{given}') is missing"
                for r in records for field, (given, column) in names.items()
                if column not in r.fields and field != "input"]
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)
    sources = {column for _, column in names.values()}
    out = []
    for r in records:
        fields = {k: v for k, v in r.fields.items() if k not in sources}
        fields.update({field: r.fields[column] for field, (_, column) in names.items() if column in r.fields})
        out.append(Record(r.where, fields))
    return out


def _read_json(path: Path) -> list[Record]:
    raw = path.read_bytes()
    stripped = raw.lstrip()
    if stripped.startswith(b"["):  # one JSON array of objects
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AlignError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise AlignError(f"{path}: {TOO_DEEP}") from None
        records, problems = [], []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                problems.append(f"{path}[{i}]: expected a JSON object, got {type(item).__name__}")
            elif (field := _surrogate_field(item)) is not None:
                problems.append(f"{path}[{i}]: {LONE_SURROGATE.format(field=field)}")
            else:
                records.append(Record(f"{path}[{i}]", item))
        if problems:
            raise DataError(problems)
        return records
    records, problems = [], []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{where}: not valid UTF-8 (byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            problems.append(f"{where}: {TOO_DEEP}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        # Only a \uD800-\uDFFF escape can put a lone surrogate into decoded text: look only then.
        if _SURROGATE_ESCAPE.search(line) and (field := _surrogate_field(obj)) is not None:
            problems.append(f"{where}: {LONE_SURROGATE.format(field=field)}")
            continue
        records.append(Record(where, obj))
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)
    return records


TOO_DEEP = "JSON nested too deeply to read (deeper than Python's recursion limit); a record holds text fields"
LONE_SURROGATE = ("field '{field}' holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                  "which is not text a tokenizer can read; fix or remove the escape")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _surrogate_field(obj: Any) -> str | None:
    """The path (`messages[1].content`) of the first string in `obj`, key or value, that holds a
    lone surrogate (unencodable as UTF-8); None when there is none. Iterative: records may nest."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return where or "(record)"
        elif isinstance(node, dict):
            for key, value in reversed(list(node.items())):
                stack.append((value, f"{where}.{key}" if where else str(key)))
                stack.append((key, f"{where}.{key!r}" if where else repr(key)))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None


def _read_with_datasets(path: str, kind: str, split: str) -> list[Record]:
    import datasets

    datasets.disable_progress_bars()
    builder = {"csv": "csv", "parquet": "parquet"}.get(kind)
    if builder is None:
        raise AlignError(f"data file '{path}': unsupported extension '.{kind}' (use .jsonl, .json, .csv or .parquet)")
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise AlignError(f"{path}: could not read as {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # CSV rows start on line 2 (after the header); parquet rows are numbered from 1.
    offset = 2 if kind == "csv" else 1
    label = "line" if kind == "csv" else "row"
    return [Record(f"{path}:{label} {i + offset}" if kind == "parquet" else f"{path}:{i + offset}", dict(r))
            for i, r in enumerate(ds)]


def _read_hub(name: str, split: str, dataset_config: str | None = None) -> list[Record]:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, name=dataset_config, split=split)
    except Exception as e:
        which = f" (config '{dataset_config}', split '{split}')" if dataset_config else f" (split '{split}')"
        raise AlignError(f"data '{name}'{which} is neither a local file nor a loadable hub dataset "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return _dataset_records(ds, name, split, dataset_config)


def _dataset_records(ds: Any, name: str, split: str, dataset_config: str | None) -> list[Record]:
    where = f"{name}[{dataset_config}/{split}]" if dataset_config else f"{name}[{split}]"
    return [Record(f"{where}[{i}]", dict(r)) for i, r in enumerate(ds)]


SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
"""What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at a directory's top."""


def _read_dataset_dir(path: Path, source: str, split: str, dataset_config: str | None) -> list[Record]:
    """A dataset directory: saved with `save_to_disk` (read with `load_from_disk`; a DatasetDict
    gives `split`), or data files `load_dataset` reads, with the configurations of its README."""
    import datasets

    datasets.disable_progress_bars()
    if any((path / f).is_file() for f in SAVED_DATASET_FILES):
        if dataset_config:
            raise AlignError(f"config key 'data.dataset_config' ('{dataset_config}') does not apply to '{source}', a "
                             "dataset saved with save_to_disk (it has no configurations)")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types for damaged directories
            raise AlignError(f"data directory '{source}': could not load it with load_from_disk "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise AlignError(f"data directory '{source}' has no split '{split}' (its splits: {', '.join(ds)})")
            ds = ds[split]
        return _dataset_records(ds, source, split, None)
    try:
        ds = datasets.load_dataset(str(path), name=dataset_config, split=split)
    except Exception as e:
        raise AlignError(f"data directory '{source}' does not load as a dataset"
                         f"{f' with config {dataset_config!r}' if dataset_config else ''} and split '{split}' "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return _dataset_records(ds, source, split, dataset_config)


# ----------------------------------------------------------------------------------------------
# Formats


def detect_format(records: list[Record], wanted: str = "auto", table: dict[str, tuple[str, ...]] = FORMAT_FIELDS) -> str:
    """The record format: `wanted` unless `auto`, else the first format whose fields the first
    record has."""
    if wanted != "auto":
        return wanted
    first = records[0]
    for fmt, fields in table.items():
        if all(f in first.fields for f in fields):
            return fmt
    known = "; ".join(f"{k}: {{{', '.join(v)}}}" for k, v in table.items())
    raise AlignError(f"{first.where}: cannot tell the record format from keys "
                     f"{sorted(first.fields)}; expected one of {known}")


def validate_records(records: list[Record], fmt: str, table: dict[str, tuple[str, ...]] = FORMAT_FIELDS) -> None:
    """Check every record has its format's fields, as non-empty strings (messages: a list of
    {role, content}); report all problems of the file together."""
    problems = []
    for rec in records:
        problems += _record_problems(rec, fmt, table[fmt])
        if len(problems) >= 100:
            break
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)


def _record_problems(rec: Record, fmt: str, required: tuple[str, ...]) -> list[str]:
    out = []
    for name in required:
        if name not in rec.fields or rec.fields[name] is None:
            near = difflib.get_close_matches(name, [k for k in rec.fields if k not in required], n=1, cutoff=0.6)
            out.append(f"{rec.where}: missing field '{name}'" + (f" (found '{near[0]}': misspelt?)" if near else ""))
            continue
        value = rec.fields[name]
        if name == "messages" or (fmt == "preference" and isinstance(value, list)):
            out += _messages_problems(rec.where, name, value)
        elif not isinstance(value, str):
            out.append(f"{rec.where}: field '{name}' must be a string, got {type(value).__name__}")
        elif not value.strip():
            out.append(f"{rec.where}: field '{name}' is empty")
    if fmt == "alpaca" and rec.fields.get("input") is not None and not isinstance(rec.fields["input"], str):
        out.append(f"{rec.where}: field 'input' must be a string")
    if fmt == "preference" and not out and rec.fields["chosen"] == rec.fields["rejected"]:
        out.append(f"{rec.where}: 'chosen' and 'rejected' are identical (the pair teaches nothing)")
    return out


def _messages_problems(where: str, name: str, messages: Any) -> list[str]:
    """A message list's problems: not a list of {role, content} strings; an empty assistant turn
    (rejected like an empty response: it trains the model to stop at once); and for a conversation
    (`messages`, or a preference record's `prompt`) an opening assistant turn, which answers no one.
    A preference record's `chosen`/`rejected` may hold assistant turns alone (the prompt is apart)."""
    if not isinstance(messages, list) or not messages:
        return [f"{where}: field '{name}' must be a non-empty list of messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return [f"{where}: {name}[{i}] must be an object with string 'role' and 'content'"]
    out = [f"{where}: {name}[{i}] is an empty assistant turn; write its answer or drop the turn"
           for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
    opening = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if name in ("messages", "prompt") and opening is not None and messages[opening]["role"] == "assistant":
        out.insert(0, f"{where}: {name}[{opening}] opens the conversation with an assistant turn; it must start "
                      "with a user turn (after any system turn)")
    return out


def prompt_fields(rec: Record, fmt: str) -> dict[str, str]:
    """The values a prompt template may use for this record."""
    f = rec.fields
    if fmt == "alpaca":
        inp = (f.get("input") or "").strip()
        prompt = f["instruction"] + (f"\n\n{inp}" if inp else "")
        return {"prompt": prompt, "instruction": f["instruction"], "input": inp}
    return {"prompt": f["prompt"]}


def apply_template(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except KeyError as e:
        raise AlignError(f"config key 'data.prompt_template' uses {{{e.args[0]}}}, which {where} does not provide "
                         f"(available: {', '.join('{' + k + '}' for k in values)})") from None
    except (IndexError, ValueError) as e:
        raise AlignError(f"config key 'data.prompt_template' is not a valid template: {e}") from None


def sft_segments(rec: Record, fmt: str, template: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """A record as `(text, trainable)` segments; EOS is appended later for non-chat formats."""
    if fmt == "chat":
        return chat_segments(rec, tokenizer)
    response = {"alpaca": "output", "prompt_response": "response", "prompt_completion": "completion"}[fmt]
    return [(apply_template(template, prompt_fields(rec, fmt), rec.where), False), (rec.fields[response], True)]


def chat_segments(rec: Record, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a rendered conversation into non-trainable context and trainable assistant turns.

    For the i-th assistant turn, render messages[:i] with the generation prompt (the context the
    model answers) and messages[:i+1] (context plus the turn and its end-of-turn token); the turn is
    the difference. This works for any template whose renders extend each other, and we check that.
    """
    messages = rec.fields["messages"]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError([f"{rec.where}: conversation has no assistant turn to train on"])
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=rec.where)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, where=rec.where)
        if not context.startswith(done) or not full.startswith(context):
            raise AlignError(f"{rec.where}: the tokenizer's chat template does not render turns as a growing "
                             "prefix, so assistant turns cannot be located")
        segments += [(context[len(done):], False), (full[len(context):], True)]
        done = full
    return [s for s in segments if s[0]]


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise AlignError(f"{where}: chat records need a tokenizer with a chat template, and this one has none")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # the template's own `raise_exception` (Gemma: "System role not supported")
        raise DataError([f"{where}: the tokenizer's chat template refuses this conversation: {e}"]) from None


TURN_PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}),
    ({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "Four."}),
)
"""Conversations `turn_end_token` renders to find how the template closes an assistant turn; the
second for templates that insist on a system turn."""


def turn_end_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's chat template closes an assistant turn with (Gemma's
    `<end_of_turn>`, Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`, Phi-3's `<|end|>`), or None when
    there is no chat template or the turn ends in plain text.

    Read from the template itself, not from a table of model families: a one-exchange conversation
    is split as SFT splits records (`chat_segments`), and the trained segment's text after the reply
    is matched against the tokenizer's special tokens (the longest that starts it, after any
    whitespace). The tokenizer's EOS plays no part, so this is defined for a tokenizer without one.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    problems: list[str] = []
    for probe in TURN_PROBES:
        try:
            segments = chat_segments(Record("the chat template", {"messages": list(probe)}), tokenizer)
        except DataError as e:  # the template refuses this probe: try the next
            problems += e.problems
            continue
        turn = next(text for text, trainable in reversed(segments) if trainable)
        reply = probe[-1]["content"]
        if reply not in turn:
            return None
        rest = turn[turn.index(reply) + len(reply):].lstrip()
        specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        found = [s for s in specials | set(tokenizer.all_special_tokens) if s and rest.startswith(s)]
        return max(found, key=len) if found else None
    raise AlignError(f"the tokenizer's chat template renders no plain user/assistant exchange, so align cannot tell "
                     f"which token ends an assistant turn ({problems[-1]})")


def prompt_text(rec: Record, fmt: str, template: str, tokenizer: Any) -> str:
    """The text the policy is prompted with: the templated prompt, or for chat the conversation up
    to its last user turn plus the generation prompt."""
    if fmt == "chat":
        messages = rec.fields["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return render_chat(tokenizer, messages, add_generation_prompt=True, where=rec.where)
    return apply_template(template, prompt_fields(rec, fmt), rec.where)


# ----------------------------------------------------------------------------------------------
# Tokenizing


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer adds it to a plain encode (Llama-style), else nothing. Computed by
    asking the tokenizer, since `add_bos_token` is not a reliable attribute across tokenizers."""
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    if len(with_special) > len(without) and with_special[0] == tokenizer.bos_token_id:
        return [tokenizer.bos_token_id]
    return []


def encode_segments(tokenizer: Any, segments: list[tuple[str, bool]], add_eos: bool,
                    prefix: list[int] | None = None) -> Example:
    """Tokenize each segment separately and concatenate; mask from segment lengths."""
    ids: list[int] = list(prefix or [])
    mask: list[int] = [0] * len(ids)
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [int(trainable)] * len(piece)
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return Example(ids, mask)


@dataclass
class TokenizeReport:
    kept: int = 0
    dropped: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        return f"{self.kept} examples ({self.truncated} truncated, {self.dropped} dropped as too long)"


def fit_length(ex: Example, max_length: int, policy: str, where: str, report: TokenizeReport,
               context: int | None = None) -> Example | None:
    """Apply the truncation policy to one example; None when it is dropped. A kept example longer
    than the model's `context` (positions) is an error naming its line."""
    if len(ex.input_ids) <= max_length:
        kept = ex
    elif policy == "error":
        raise DataError([f"{where}: example is {len(ex.input_ids)} tokens, longer than data.max_length "
                         f"({max_length}); raise max_length or set data.truncation to drop or truncate"])
    elif policy == "truncate" and any(ex.loss_mask[:max_length]):
        kept = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
        report.truncated += 1
    else:
        report.dropped += 1
        return None
    if context is not None and len(kept.input_ids) > context:
        raise DataError([f"{where}: example is {len(kept.input_ids)} tokens, longer than the model's context "
                         f"({context} positions); set data.max_length to {context} or less to drop or truncate it"])
    report.kept += 1
    return kept


def tokenize_sft(records: list[Record], fmt: str, template: str, tokenizer: Any, max_length: int,
                 truncation: str, context: int | None = None) -> tuple[list[Example], TokenizeReport]:
    """Records -> examples `prompt + response + EOS` with the loss on response and EOS; none may
    exceed the model's `context` (see `fit_length`)."""
    prefix = [] if fmt == "chat" else bos_prefix(tokenizer)
    report = TokenizeReport()
    out, problems = [], []
    for rec in records:
        try:
            ex = encode_segments(tokenizer, sft_segments(rec, fmt, template, tokenizer), add_eos=fmt != "chat",
                                 prefix=prefix)
            if not any(ex.loss_mask):
                raise DataError([f"{rec.where}: the response tokenizes to nothing"])
            fitted = fit_length(ex, max_length, truncation, rec.where, report, context)
        except DataError as e:  # keep going: every bad record of the file is reported together
            problems += e.problems
            continue
        if fitted is not None:
            out.append(fitted)
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)
    if not out:
        raise AlignError(f"every example is longer than data.max_length ({max_length}); none left to train on")
    return out, report


def split_validation(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of `items` (at least one when fraction > 0), chosen by a seeded shuffle."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(items) * fraction)))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ----------------------------------------------------------------------------------------------
# Batching


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, attention_mask and labels, all (B, T);
    labels carry IGNORE_INDEX on prompt and padding. Masks come from lengths, not token values.
    The rows are built as Python lists and become tensors in one call each (a tensor per example
    cost ~10% of a small model's SFT step; tests/test_perf_guards.py checks it is the same batch)."""
    width = max(len(e.input_ids) for e in examples)
    ids, attention, labels = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        attention.append([1] * len(e.input_ids) + [0] * pad)
        labels.append([t if m else IGNORE_INDEX for t, m in zip(e.input_ids, e.loss_mask)] + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def pack_examples(examples: list[Example], pad_id: int, max_row_factor: int = 3) -> dict[str, torch.Tensor]:
    """Padding-free batch (`train.padding_free`): the examples packed into rows with position ids
    restarting at 0 for each example.

    Returns input_ids, position_ids, labels and token_mask (1 on real tokens), all (R, W) with
    R <= B rows. The model gets no attention mask: given position ids alone, transformers' causal
    mask confines each token to its own example (`masking_utils.find_packed_sequence_indices`),
    and a row's pad tail comes after all its real tokens, so causal attention never reads it.
    Each example's first label is IGNORE_INDEX so that the previous example's last token is not
    trained to predict it (in a padded batch it is dropped by the shift anyway): the loss and the
    item count equal `pad_examples'`.

    Packing: for each row count R, longest-first onto the emptiest row (balanced rows); the R with
    the fewest slots R x W wins (ties: the narrowest), rows no wider than `max_row_factor` x the
    longest example (attention's cost grows with the row width, the linear layers' with R x W only;
    examples of equal length therefore stay one per row).
    """
    lengths = [len(e.input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    best: tuple[int, list[list[int]], list[int]] | None = None
    for n_rows in range(max(1, -(-sum(lengths) // (max_row_factor * lengths[order[0]]))), len(examples) + 1):
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        fill = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=fill.__getitem__)
            rows[r].append(i)
            fill[r] += lengths[i]
        if best is None or n_rows * max(fill) <= best[0]:  # a tie goes to narrower rows: less attention
            best = (n_rows * max(fill), rows, fill)
    _, rows, fill = best
    width = max(fill)
    ids, positions, labels, real = [], [], [], []
    for row, used in zip(rows, fill):
        pad = width - used
        ids.append([t for i in row for t in examples[i].input_ids] + [pad_id] * pad)
        positions.append([p for i in row for p in range(lengths[i])] + [0] * pad)
        labels.append([t if m and p > 0 else IGNORE_INDEX for i in row
                       for p, (t, m) in enumerate(zip(examples[i].input_ids, examples[i].loss_mask))]
                      + [IGNORE_INDEX] * pad)
        real.append([1] * used + [0] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "position_ids": torch.tensor(positions, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long), "token_mask": torch.tensor(real, dtype=torch.long)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, epoch), so a resumed run can
    recompute it instead of storing it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, global_batch: int, seed: int, start_epoch: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """Endless (epoch, index-in-epoch, example indices) of global batches; the last partial batch
    of an epoch is dropped so every optimizer step sees the same number of examples."""
    if n < global_batch:
        raise AlignError(f"only {n} training examples, fewer than one global batch ({global_batch}); "
                         "lower train.batch_size or train.grad_accum")
    epoch = start_epoch
    while True:
        order = epoch_order(n, seed, epoch)
        for b in range(n // global_batch):
            yield epoch, b, order[b * global_batch:(b + 1) * global_batch]
        epoch += 1


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch (contiguous block, so shapes match across ranks)."""
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


# ----------------------------------------------------------------------------------------------
# Preference pairs and prompt sets


def preference_segments(rec: Record, side: str, template: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """One side (`chosen` or `rejected`) of a pair as segments. Strings are a templated prompt plus
    the response (EOS appended later); message lists are rendered with the chat template: the
    prompt (a string becomes one user turn) followed by the side's assistant turns, or the side
    alone when it holds the whole conversation (TRL's implicit-prompt preference format)."""
    prompt, answer = rec.fields["prompt"], rec.fields[side]
    if isinstance(answer, list):
        if any(m["role"] != "assistant" for m in answer):  # the side holds the whole conversation
            return chat_segments(Record(rec.where, {"messages": answer}), tokenizer)
        context = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return chat_segments(Record(rec.where, {"messages": context + answer}), tokenizer)
    if isinstance(prompt, list):
        raise AlignError(f"{rec.where}: a message-list prompt needs message-list 'chosen' and 'rejected'")
    return [(apply_template(template, {"prompt": prompt}, rec.where), False), (answer, True)]


def tokenize_pairs(records: list[Record], template: str, tokenizer: Any, max_length: int,
                   truncation: str, context: int | None = None) -> tuple[list[tuple[Example, Example]], TokenizeReport]:
    """Records -> (chosen, rejected) examples, each `prompt + answer (+ EOS)`. A pair is dropped
    when either side is dropped, so both sides always see the same prompt."""
    prefix = bos_prefix(tokenizer)
    report, out, problems = TokenizeReport(), [], []
    for rec in records:
        sides = []
        try:
            for side in ("chosen", "rejected"):
                is_chat = isinstance(rec.fields[side], list)
                ex = encode_segments(tokenizer, preference_segments(rec, side, template, tokenizer),
                                     add_eos=not is_chat, prefix=[] if is_chat else prefix)
                sides.append(fit_length(ex, max_length, truncation, rec.where, TokenizeReport(), context))
        except DataError as e:  # keep going: every bad record of the file is reported together
            problems += e.problems
            continue
        if sides[0] is None or sides[1] is None:
            report.dropped += 1
            continue
        report.kept += 1
        out.append((sides[0], sides[1]))
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)
    if not out:
        raise AlignError(f"every preference pair is longer than data.max_length ({max_length}); none left to train on")
    return out, report


def pad_pairs(pairs: list[tuple[Example, Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sides then rejected sides in one right-padded batch: (2B, T) ids and attention mask."""
    batch = pad_examples([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass
class Prompt:
    """A prompt for generation: its raw text (what reward functions see), and its token ids."""

    text: str
    ids: list[int]
    where: str


def load_prompts(source: str, fmt: str, template: str, tokenizer: Any, max_length: int, truncation: str,
                 split: str = "train", max_samples: int | None = None, context: int | None = None,
                 new_tokens: int = 0, dataset_config: str | None = None,
                 columns: dict[str, str] | None = None) -> tuple[list[Prompt], TokenizeReport]:
    """Read a prompt set: records of any SFT format (the response, if any, is ignored), or
    `{prompt}` alone. Ids are built exactly as in SFT, so the policy sees what it was trained on.
    A prompt longer than `max_length` tokens is dropped, or stops the run (truncation `error`);
    prompts are never cut, since a cut prompt asks a different question. A kept prompt that leaves
    no room for `new_tokens` in the model's `context` is an error naming its line."""
    records, fmt = read_prompt_records(source, fmt, split, max_samples, dataset_config, columns)
    prefix = [] if fmt == "chat" else bos_prefix(tokenizer)
    report, out, problems = TokenizeReport(), [], []
    for rec in records:
        text = prompt_text(rec, fmt if fmt != "prompt" else "prompt_response", template, tokenizer)
        ids = prefix + tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > max_length:
            if truncation == "error":
                problems.append(f"{rec.where}: prompt is {len(ids)} tokens, longer than data.max_length "
                                f"({max_length}); raise it or set data.truncation to drop")
            report.dropped += 1
            continue
        if context is not None and len(ids) + new_tokens > context:
            problems.append(f"{rec.where}: prompt is {len(ids)} tokens; with {new_tokens} response tokens it runs past "
                            f"the model's context ({context} positions); lower data.max_length to "
                            f"{context - new_tokens} to drop such prompts, or shorten the responses")
            continue
        report.kept += 1
        raw = rec.fields["prompt"] if isinstance(rec.fields.get("prompt"), str) else text
        out.append(Prompt(raw, ids, rec.where))
    if problems:
        raise DataError(problems, MAX_REPORTED_PROBLEMS)
    if not out:
        raise AlignError(f"{source}: every prompt is longer than the prompt limit ({max_length})")
    return out, report


def read_prompt_records(source: str, fmt: str = "auto", split: str = "train", max_samples: int | None = None,
                        dataset_config: str | None = None, columns: dict[str, str] | None = None
                        ) -> tuple[list[Record], str]:
    """Read and check a prompt set (every record), without a tokenizer. Returns the records and
    their format: `chat` (a conversation), `alpaca` or `prompt`."""
    records = read_records(source, split, max_samples, dataset_config, columns)
    fmt = detect_format(records, fmt, PROMPT_FIELDS | FORMAT_FIELDS)
    if fmt in ("prompt", "preference", "prompt_response", "prompt_completion") and isinstance(
            records[0].fields.get("prompt"), list):
        # A conversation as the prompt (TRL's conversational preference/prompt sets).
        records = [Record(r.where, {"messages": r.fields.get("prompt")}) for r in records]
        fmt = "chat"
    if fmt in ("preference", "prompt_response", "prompt_completion"):
        fmt = "prompt"
    validate_records(records, fmt, PROMPT_FIELDS)
    return records, fmt
