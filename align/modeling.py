"""Model and tokenizer plumbing shared by every stage.

Loading goes through `Auto*.from_pretrained` on a local path or hub id, so any causal LM works; the
tiny models the tests and the offline recipe use are built by `init_tiny_model` and saved with
`save_pretrained`, then loaded back the same way as a real checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.config import LoraConfig, ModelConfig
from align.data import turn_end_token
from align.errors import AlignError
from align.rundir import ADAPTER_BASE_FILE

PAD_TOKEN = "<|pad|>"
"""The pad token align adds when a tokenizer has none and no unused token to reuse."""

PAD_NAMES = ("<|finetune_right_pad_id|>", PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>", "<|endoftext|>")
"""Tokens that exist to pad (Llama-3.1's, align's own, T5/Gemma's, BERT's, GPT-NeoX's) or that a
tokenizer defines but leaves unused when EOS is another token (Qwen instruct's `<|endoftext|>`), in
the order they are preferred as pad."""

RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>|<unused\d+>")
"""Placeholder tokens a vocabulary reserves and never emits (Llama-3's, Gemma's)."""

# A minimal chat template for the tiny tokenizer: role markers as plain text, EOS closing each
# assistant turn, so "loss on assistant turns" includes learning when to stop.
TINY_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def quiet_transformers() -> None:
    """Silence per-load reports and weight-loading bars: our own progress bar is the one to read."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(path: str) -> str:
    """Map a run directory of an earlier stage onto its final model (`<run>/model`).

    A path that exists, or looks like a path (`looks_like_path`), must exist and hold a model;
    anything else (`gpt2`, `org/name`) is treated as a hub id and left to from_pretrained.
    """
    p = Path(path).expanduser()
    # Absolute, so a LoRA adapter saved from this model records a base path that loads from anywhere.
    if (p / "model").is_dir():
        return str((p / "model").resolve())
    if p.exists():
        if p.is_dir() and not any((p / n).exists() for n in ("config.json", "adapter_config.json")):
            raise AlignError(f"model path '{path}' holds no model (no config.json or adapter_config.json)")
        return str(p.resolve())
    if looks_like_path(path):
        raise AlignError(f"model path '{path}' does not exist")
    return path


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_path(path: str) -> bool:
    """Whether `path` can only be meant as a local path: it starts with `.`, `/` or `~`,
    ends in a separator, has more than one `/` or any backslash, or is otherwise not of the form
    `name` / `org/name` that hub ids take. A mistyped run directory (`./runs/sfft`) then reads
    "does not exist" instead of a failed download."""
    seps = ("/", "\\", os.sep)
    return (path.startswith((".", "~", *seps)) or path.endswith(seps) or path.count("/") > 1 or "\\" in path
            or _HUB_ID.fullmatch(path) is None)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


SCORE_HEAD_KEYS = ("reward.model", "reward_model")
"""Config keys that name a frozen reward model: `inspect_model` checks what they point at has a
score head (a sequence classifier), unless told otherwise with `score_head`."""


def inspect_model(path: str, key: str, trust_remote_code: bool = False, *, score_head: bool | None = None,
                  place: str | None = None) -> Any:
    """Check, without loading a single weight, that `path` holds a model (a config and weight files
    whose headers read: `check_weights`) and return its config (AutoConfig). Errors name the config
    `key` (or `place`, e.g. a command-line argument). A LoRA adapter directory is checked through the
    base model it names. With `score_head` (default: `key` is one of SCORE_HEAD_KEYS) the model must be
    a sequence classifier with its score head, as a reward model is: a causal LM (an SFT run) would
    be scored by a head drawn at random."""
    from transformers import AutoConfig

    quiet_transformers()
    where = place or f"config key '{key}'"
    needs_head = key in SCORE_HEAD_KEYS if score_head is None else score_head
    try:
        src = resolve_model_path(path)
    except AlignError as e:
        raise AlignError(f"{where}: {e}") from None
    local = Path(src)
    if local.is_dir():
        if not any((local / name).is_file() for name in WEIGHT_FILES):
            raise AlignError(f"{where}: model path '{path}' holds no weights "
                             f"(none of {', '.join(WEIGHT_FILES)})")
        check_weights(local, key, place=place)
        if not (local / "config.json").is_file():  # a LoRA adapter: its base model holds the config
            adapter = _read_json_file(local / "adapter_config.json", where)
            base = adapter_base(local)  # the recorded base, resolved against the adapter directory
            if not isinstance(base, str) or not base:
                raise AlignError(f"{where}: adapter '{path}' does not name its base model")
            if needs_head and adapter.get("task_type") != "SEQ_CLS":
                raise AlignError(f"{where}: '{path}' is a {adapter.get('task_type') or 'causal LM'} adapter with no "
                                 "score head, not a reward model; point it at an `align rm` run")
            return inspect_model(base, key, trust_remote_code, score_head=False, place=place)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hub = "" if local.exists() else " (no such local directory, so it was looked up as a hub id)"
        raise AlignError(f"{where}: could not read the model config of '{path}'{hub}: {_first_line(e)}") from None
    architectures = getattr(config, "architectures", None) or []
    if needs_head and architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise AlignError(f"{where}: '{path}' has no score head (it is a {architectures[0]}, not a reward model); "
                         "point it at an `align rm` run, or train one from this model with `align rm`")
    return config


def check_weights(path: str | Path, key: str, place: str | None = None) -> None:
    """Open the header of every weight file in the model directory `path`, loading no tensor: each
    `*.safetensors` (its 8-byte length and JSON header, checked against the file's size, so a
    truncated copy fails here), every shard a `*.index.json` names, and the zip directory of each
    `*.bin`. A damaged file is an error naming it and the config `key` (or `place`)."""
    from safetensors import safe_open

    local = Path(path)
    if not local.is_dir():
        return  # a hub id: checked when it is downloaded
    where = place or f"config key '{key}'"
    for index in sorted(local.glob("*.index.json")):
        weight_map = _read_json_file(index, where)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise AlignError(f"{where}: weights index '{index}' has no 'weight_map'; re-save or re-download the model")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (local / shard).is_file():
                raise AlignError(f"{where}: weights index '{index}' names shard '{shard}', which is missing; "
                                 "re-download the model")
    for file in sorted(local.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                n_tensors = len(list(f.keys()))
        except Exception as e:  # SafetensorError, not importable by name; OSError
            raise AlignError(f"{where}: weights file '{file}' is damaged or truncated ({_first_line(e)}); "
                             "re-save or re-download the model") from None
        if n_tensors == 0:
            raise AlignError(f"{where}: weights file '{file}' holds no tensors; re-save or re-download the model")
    for file in sorted(local.glob("*.bin")):
        with open(file, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80":
            continue  # a legacy (pre-zip) torch.save pickle: nothing to check without loading it
        try:
            zipfile.ZipFile(file).close()  # reads the central directory at the end: a cut file has none
        except (zipfile.BadZipFile, OSError) as e:
            raise AlignError(f"{where}: weights file '{file}' is damaged or truncated ({e}); "
                             "re-save or re-download the model") from None


def _read_json_file(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AlignError(f"{where}: '{path}' is not readable JSON ({_first_line(e)})") from None


def context_length(*configs: Any) -> int | None:
    """The most positions every one of these models was built for: the smallest context their
    configs state (None when none states one)."""
    found = []
    for config in configs:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                found.append(value)
                break
    return min(found, default=None)


def parameter_counts(config: Any, auto_cls: Any, lora: LoraConfig | None = None,
                     trust_remote_code: bool = False) -> tuple[int, int]:
    """(total, trained) parameters of `auto_cls.from_config(config)`, built on the meta device (no
    memory, no weights). With `lora` enabled, trained is the adapter, r x (in + out) per targeted
    linear layer, plus a sequence classifier's score head (trained in full)."""
    from accelerate import init_empty_weights

    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    # Under init_empty_weights transformers 5 leaves tied embeddings untied: tie them, or a tied
    # output head (Qwen2, Gemma, GPT-2, OPT) is counted twice.
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if lora is None or not lora.enabled:
        return total, total
    head = getattr(model, "score", None)
    skip = {id(m) for m in (model.get_output_embeddings(), head) if m is not None}
    targets = None if lora.target == "all" else set(lora.target)

    def shape(m: nn.Module) -> int:  # in + out features; GPT-2's Conv1D stores its weight as (in, out)
        return m.in_features + m.out_features if isinstance(m, nn.Linear) else sum(m.weight.shape)

    adapter = sum(lora.r * shape(m) for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in skip
                  and (targets is None or name.rsplit(".", 1)[-1] in targets))
    return total, adapter + (sum(p.numel() for p in head.parameters()) if head is not None else 0)


def load_tokenizer(path: str, padding_side: str = "right", key: str | None = None) -> Any:
    """Load a tokenizer and give it a pad token distinct from EOS when it has none (or pads with EOS).
    Errors name the config `key` the path came from, when given.

    EOS must never double as pad: masks built from token equality would then hide the real EOS
    of every response. We build masks from lengths anyway; a distinct pad keeps checkpoints safe
    for tools that do not. An unused token of the vocabulary is reused when there is one (see
    `unused_pad_token`); only when there is none is `PAD_TOKEN` added, which grows the vocabulary,
    so the embeddings are resized and a LoRA adapter must carry them (see `save_model`).
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    where = f"config key '{key}': " if key else ""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError) as e:
        raise AlignError(f"{where}could not load tokenizer '{path}': {_first_line(e)}") from None
    except AlignError as e:
        raise AlignError(f"{where}{e}") from None
    if tok.eos_token_id is None:
        raise AlignError(f"{where}tokenizer '{path}' has no EOS token; responses could never end")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        give_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def give_pad_token(tok: Any) -> None:
    """Set a pad token other than EOS: an unused one of the vocabulary, else `PAD_TOKEN`, added."""
    reusable = unused_pad_token(tok)
    if reusable is not None:
        tok.pad_token = reusable
    else:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})


def stop_at_turn_end(tok: Any) -> str | None:
    """Make the token the chat template closes an assistant turn with (`data.turn_end_token`) the
    tokenizer's EOS, when it is another token; return a line saying so, or None when nothing changed
    (EOS already closes the turn, as Llama 3's `<|eot_id|>` and Qwen's `<|im_end|>` do, or the turn
    ends in plain text). Called where a stage trains on chat records, before the model loads.

    Why: chat SFT trains on the template's turn end, while align samples, truncates, penalises a
    missing EOS and reads rewards by `eos_token_id` alone. Gemma closes turns with `<end_of_turn>`
    (EOS is `<eos>`), Phi-3 with `<|end|>`: left alone, the trained model stops at a token it never
    learnt to emit. The tokenizer saved with the model (full weights or adapter) carries the new EOS,
    so every later stage stops at it. LLaMA-Factory's templates do the same (`replace_eos` with the
    template's stop word), and TRL's `clone_chat_template` sets the template's EOS on tokenizer and
    model. The pad token is chosen again if it was this token (EOS never pads); the old EOS stays a
    stop token of the model's configs (`stop_at_eos`).
    """
    end = turn_end_token(tok)
    if end is None or end == tok.eos_token:
        return None
    old = tok.eos_token
    tok.eos_token = end
    if tok.pad_token_id == tok.eos_token_id:
        give_pad_token(tok)
    return (f"EOS is now {end!r}, the token the chat template closes assistant turns with "
            f"({f'was {old!r}' if old else 'there was none'})")


def stop_at_eos(model: Any, tok: Any) -> None:
    """Put the tokenizer's EOS first among the stop ids of `model.config` and its generation config
    when they lack it, so tools that read a saved checkpoint's configs (transformers' `generate`,
    vLLM) stop where align does. Ids already there stay as further stop ids (Gemma's checkpoints list
    `[<eos>, <end_of_turn>]`); align's own sampling reads the tokenizer alone."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        ids = config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tok.eos_token_id not in ids:
            ids = [tok.eos_token_id, *ids]
            config.eos_token_id = ids[0] if len(ids) == 1 else ids


def unused_pad_token(tok: Any) -> str | None:
    """A token of `tok`'s vocabulary that can pad without growing it, or None.

    Candidates, in order: `PAD_NAMES`, reserved placeholders (`RESERVED_TOKEN`, lowest id first),
    then an UNK token. None may be EOS or BOS, nor appear in the chat template (which would mean
    the model is taught to read or emit it). Reusing one keeps the embedding matrix as it is, so a
    LoRA adapter stays small and loads with every standard loader.
    """
    vocab = tok.get_vocab()
    taken = {tok.eos_token_id, tok.bos_token_id}
    templates = tok.chat_template if isinstance(tok.chat_template, dict) else {"": tok.chat_template or ""}
    template_text = "\n".join(templates.values())
    reserved = [t.content for _, t in sorted(tok.added_tokens_decoder.items()) if RESERVED_TOKEN.fullmatch(t.content)]
    for token in (*PAD_NAMES, *reserved, tok.unk_token):
        if token and token in vocab and vocab[token] not in taken and token not in template_text:
            return token
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__




def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model a LoRA adapter directory names, or None when it is no adapter directory (no
    adapter_config.json, or a config.json beside it: a full model) or names no base.

    The base recorded relative to the adapter directory (`align_base.json`, written by
    `record_base_path`) wins when it exists, so a run directory moved together with its base model
    loads; else `base_model_name_or_path` as written (an absolute path, a hub id).
    """
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file() or (adapter_dir / "config.json").is_file():
        return None
    side = adapter_dir / ADAPTER_BASE_FILE
    if side.is_file():
        relative = json.loads(side.read_text()).get("relative")
        if relative and (adapter_dir / relative).is_dir():
            return str((adapter_dir / relative).resolve())
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    return base or None


def adapter_task(adapter_dir: str | Path) -> str | None:
    """The peft `task_type` of an adapter directory (`CAUSAL_LM`, `SEQ_CLS`, ...), or None."""
    config = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config.read_text()).get("task_type") if config.is_file() else None


def record_base_path(adapter_dir: str | Path, base_path: str) -> None:
    """Record where an adapter's base model is, both ways: `base_model_name_or_path` in
    adapter_config.json absolute (what peft and transformers read, resolving a relative path
    against the working directory, so an absolute one loads from anywhere), and relative to the
    adapter directory in `align_base.json` (what `adapter_base` reads first, so align still loads
    the adapter after the run directory and its base moved together). A hub id is written as is.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = Path(base_path).expanduser()
    if bool(base_path) and base.is_dir():
        config["base_model_name_or_path"] = str(base.resolve())
        (adapter_dir / ADAPTER_BASE_FILE).write_text(json.dumps(
            {"relative": os.path.relpath(base.resolve(), adapter_dir.resolve())}) + "\n")
    else:
        config["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def from_pretrained(auto_cls: Any, src: str, tokenizer: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`auto_cls.from_pretrained(src, output_loading_info=True, **kwargs)`: the model and transformers'
    loading report (missing, unexpected, mismatched keys), except that a LoRA adapter directory is
    loaded as its base model (`adapter_base`), grown to `tokenizer`'s length, with the adapter
    merged into it: the model the adapter's run trained, as plain weights.

    transformers' own loading of an adapter directory resolves a relative base path against the
    working directory, and never grows the base's embeddings, so a checkpoint's adapter that
    carries grown embeddings (see `save_model`) fails there on a size mismatch.
    """
    base = adapter_base(src)
    model, info = auto_cls.from_pretrained(base or src, output_loading_info=True, **kwargs)
    if base is None:
        return model, info
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(src)
    if config.task_type == "CAUSAL_LM" and not hasattr(model, "prepare_inputs_for_generation"):
        # A causal LM's adapter under a sequence classifier (a critic or reward model started from
        # a LoRA SFT run): only the backbone's LoRA weights apply, so load it as an untyped adapter
        # (peft's causal-LM wrapper needs generation methods a classifier lacks).
        config.task_type = None
    # Merged, not attached: a stage that trains a new LoRA on this model (PPO with LoRA from a LoRA
    # SFT run) must start from base + adapter, and peft names every new adapter "default", the
    # name an attached adapter already has, so attaching would let the new one replace it.
    model = PeftModel.from_pretrained(model, src, config=config).merge_and_unload()
    # peft froze the base for its adapter; a merged model is trainable like any loaded one
    # (`load_pretrained` freezes the frozen roles itself).
    model.requires_grad_(True)
    return model, info


def weight_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pretrained(auto_cls: Any, cfg: ModelConfig, tokenizer: Any, *, trainable: bool,
                    device: torch.device | None = None, path: str | None = None, new_head_ok: bool = False,
                    **kwargs: Any) -> Any:
    """Load `auto_cls.from_pretrained(path)` the way every stage wants it.

    Trained models keep float32 master weights (mixed precision is accelerate's job); frozen
    models take `cfg.dtype`. The embedding matrix grows when the tokenizer gained a pad token; the
    configs name the tokenizer's pad and EOS (`stop_at_eos`).

    Strict: a tensor of the model that the weights lack, or hold in another shape, is an error
    naming the path and the first tensors (transformers would draw them at random and only warn,
    and we silence its warnings). The one exception is opt-in: with `new_head_ok`, a sequence
    classifier's head (every tensor outside the backbone, `score.*`) may be missing, as it is when
    a new reward model or a critic starts from a causal LM; a note says so, once per path.
    Tied weights (an `lm_head` tied to the embeddings) are not missing: transformers ties them.
    """
    quiet_transformers()
    device = device or torch.device("cpu")
    dtype = torch.float32 if trainable else weight_dtype(cfg.dtype, device)
    shown = path or cfg.path
    src = resolve_model_path(shown)
    check_weights(src, "", place=f"could not load model '{shown}'")
    extra = dict(kwargs)
    extra.setdefault("ignore_mismatched_sizes", True)  # reported below, by name, instead of raised
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    try:
        model, info = from_pretrained(auto_cls, src, tokenizer, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                      **extra)
    except (OSError, ValueError) as e:
        raise AlignError(f"could not load model '{shown}': {_first_line(e)}") from None
    except RuntimeError as e:  # transformers' "Error(s) in loading state_dict ..."
        if "state_dict" not in str(e) and "conversion" not in str(e):
            raise
        raise AlignError(f"could not load model '{shown}': {_first_line(e)}") from None
    check_loading_info(model, info, shown, new_head_ok)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None or model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
    stop_at_eos(model, tokenizer)
    if cfg.disable_dropout:
        disable_dropout(model)
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model.to(device)


_NOTED_NEW_HEADS: set[str] = set()
SHOWN_TENSORS = 3
"""How many missing or mismatched tensors an error names."""


def check_loading_info(model: Any, info: dict[str, Any], shown: str, new_head_ok: bool = False) -> None:
    """Raise for what `from_pretrained(..., output_loading_info=True)` reports as missing or of the
    wrong shape (see `load_pretrained`); note a new head when `new_head_ok` allows it."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(info.get("missing_keys") or ())
    head = [k for k in missing if prefix != "." and not k.startswith(prefix)]
    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    if new_head_ok and is_classifier and head:
        missing = [k for k in missing if k not in head]
        if not missing and shown not in _NOTED_NEW_HEADS:
            _NOTED_NEW_HEADS.add(shown)
            if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
                print(f"note: {shown} has no score head; a new one is initialised (expected for a new reward "
                      "model / critic)", flush=True)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = ", ".join(f"{k}: {tuple(a)} in the file, {tuple(b)} in the model"
                           for k, a, b in mismatched[:SHOWN_TENSORS])
        more = f" and {len(mismatched) - SHOWN_TENSORS} more" if len(mismatched) > SHOWN_TENSORS else ""
        raise AlignError(f"could not load model '{shown}': {len(mismatched)} tensor(s) have another shape than its "
                         f"config.json says ({shapes}{more}); the weights belong to another model")
    if not missing:
        return
    if is_classifier and missing == head:
        raise AlignError(f"could not load model '{shown}': it has no score head (its weights lack "
                         f"{', '.join(head[:SHOWN_TENSORS])}): it is not a reward model; point at an `align rm` run")
    total = len(model.state_dict())
    names = ", ".join(missing[:SHOWN_TENSORS]) + (", ..." if len(missing) > SHOWN_TENSORS else "")
    unexpected = sorted(info.get("unexpected_keys") or ())
    hint = (f", and hold {len(unexpected)} it does not use ({unexpected[0]}{', ...' if len(unexpected) > 1 else ''}: "
            "another architecture's weights?)" if unexpected else "")
    raise AlignError(f"could not load model '{shown}': its weights lack {len(missing)} of the model's {total} "
                     f"tensors ({names}){hint}; those would start from random values: re-save or re-download it")


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: modules and the attention-dropout config fields."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


@torch.no_grad()
def packs_exactly(model: nn.Module) -> bool:
    """Whether `model` keeps examples packed into one row apart when given only position ids that
    restart per example (what `train.padding_free` relies on): the logits of a second example packed
    behind a first must equal its logits alone. Tested on the model itself, because it depends on the
    architecture and attention implementation: transformers' `create_causal_mask` models (Llama,
    Qwen2, Mistral, GPT-2, GPT-NeoX, Phi...) pass; OPT and Bloom, say, attend across examples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (7,), generator=g)
    try:
        packed = model(input_ids=torch.cat([first, second])[None].to(device), use_cache=False,
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)).logits[0, 5:]
        alone = model(input_ids=second[None].to(device), position_ids=torch.arange(7)[None].to(device),
                      use_cache=False).logits[0]
    except (TypeError, ValueError):  # no position_ids argument, or no mask without an attention mask
        return False
    finally:
        model.train(was_training)
    packed, alone = packed.float(), alone.float()
    # float32 agrees to rounding (~1e-7 relative); bf16/fp16 differ by rounding between the two
    # shapes, while attention across examples moves logits by a sizeable fraction of their scale.
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return bool((packed - alone).abs().max() <= tolerance * alone.abs().max().clamp(min=1.0))


def apply_lora(model: nn.Module, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap `model` in a peft LoRA adapter. `target: all` is peft's `all-linear` (every linear layer
    except the output head); for a sequence classifier the score head is trained in full."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_lora_config(cfg, task_type))
    except ValueError as e:
        raise AlignError(f"config key 'lora.target': {_first_line(e)}") from None


def peft_lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    """Our LoRA section as a peft `LoraConfig` (also handed to TRL's trainers as `peft_config`)."""
    from peft import LoraConfig as PeftLoraConfig

    target = "all-linear" if cfg.target == "all" else list(cfg.target)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                          task_type=task_type, bias="none")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    # ZeRO-3 leaves each process an empty placeholder per parameter; `ds_numel` is the real size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, merge_lora: bool = False,
               standalone: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a model that `Auto*.from_pretrained(out_dir)` loads: full weights, a peft adapter
    (loaded through transformers' peft integration), or the adapter merged into the base.
    `state_dict`: the full weights of a sharded model, gathered by every process
    (align/sharding.py), written instead of this process's shards.

    An adapter records its base relative to `out_dir` (`record_base_path`). When align grew the
    vocabulary (`load_tokenizer` had to add a pad token), the base checkpoint lacks the resized
    embedding and output head, and transformers never grows a base it loads for an adapter, so:
    - `standalone` (a final model): the grown base is saved in `out_dir/base/` and the adapter
      names it, so `AutoModelForCausalLM`, `AutoPeftModelForCausalLM` and lm-eval's `peft=` load
      the adapter directory as they load any (the price: a copy of the base, only for tokenizers
      with no pad, unknown or reserved token to reuse, GPT-2's for one);
    - else (a checkpoint, read back only by align): the adapter carries the grown embedding and
      head (peft's `save_embedding_layers`), which align and peft load onto the grown base.
    """
    out_dir = Path(out_dir)
    if state_dict is not None and isinstance(model, ScoreModel):  # gathered from the wrapper: `model.` keys
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    inner = model.model if isinstance(model, ScoreModel) else model
    if merge_lora and state_dict is not None and hasattr(inner, "get_base_model"):
        # Sharded: merge the gathered weights, not the shards this process holds.
        inner.get_base_model().save_pretrained(out_dir, safe_serialization=True,
                                               state_dict=merged_lora_weights(inner, state_dict))
        tokenizer.save_pretrained(out_dir)
        return
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        inner = model.model if isinstance(model, ScoreModel) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else None
    gathered = {"state_dict": state_dict} if state_dict is not None else {}
    if base is None:
        model.save_pretrained(out_dir, safe_serialization=True, **gathered)
    elif vocabulary_grown(base) and standalone:
        base_dir = out_dir / GROWN_BASE_DIR
        weights = base.state_dict() if state_dict is None else _unprefixed(state_dict)
        base.save_pretrained(base_dir, safe_serialization=True, state_dict=_base_weights(weights))
        tokenizer.save_pretrained(base_dir)
        inner.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False, **gathered)
        record_base_path(out_dir, str(base_dir))
    else:
        inner.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=vocabulary_grown(base),
                              **gathered)
        record_base_path(out_dir, base.name_or_path)
    tokenizer.save_pretrained(out_dir)


GROWN_BASE_DIR = "base"
"""Inside an adapter's model directory: its base with the embeddings align grew (see `save_model`)."""


PEFT_PREFIX = "base_model.model."
"""What a peft model's state dict puts before the base model's own names."""


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft model's (gathered) state dict under its base model's state-dict names."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def _base_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a peft-wrapped model without its adapters, from its base model's state dict
    (`get_base_model().state_dict()`), under the model's own names: LoRA tensors dropped,
    `<layer>.base_layer.weight` -> `<layer>.weight`, and for a trained head (peft's
    modules_to_save) the original module's copy."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def merged_lora_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `merge_and_unload` would leave, computed from the peft model's full state dict `state`
    (gathered from shards: the modules' own parameters are only this process's part) and the
    adapter settings of its LoRA layers: W + scaling * B A per adapted layer, transposed for
    fan-in-fan-out (GPT-2's Conv1D), as peft's `LoraLayer.get_delta_weight`; for a trained head
    (modules_to_save) the trained copy. Names are the base model's own."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    state = _unprefixed(state)
    layers = {name: m for name, m in model.get_base_model().named_modules()
              if isinstance(m, LoraLayer) and adapter in m.lora_A}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        layer = name.removesuffix(".weight")
        if layer in layers:
            m = layers[layer]
            if m.use_dora.get(adapter):
                raise AlignError(f"'{layer}': merging a DoRA adapter from sharded weights is not supported")
            delta = state[f"{layer}.lora_B.{adapter}.weight"] @ state[f"{layer}.lora_A.{adapter}.weight"]
            delta = (delta.T if m.fan_in_fan_out else delta) * m.scaling[adapter]
            tensor = tensor + delta.to(tensor.dtype)
        out[name] = tensor
    return out


def vocabulary_grown(model: nn.Module) -> bool:
    """Whether `model`'s input embeddings have more rows than the checkpoint it was loaded from
    declares (`vocab_size` of the config at `model.name_or_path`)."""
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(model.name_or_path).get_text_config().vocab_size
    return model.get_input_embeddings().num_embeddings > saved


# ----------------------------------------------------------------------------------------------
# Tiny offline models


def train_byte_tokenizer(corpus: list[str], vocab_size: int = 260) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style): any UTF-8 text round-trips, Chinese included.

    With the default 260 entries it is the 256 bytes plus [PAD] [BOS] [EOS] [UNK] and learns no
    merges, so digits stay one token each (which is what arithmetic tasks want).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


BYTE_VOCAB = 260
"""The byte-level tokenizer's smallest vocabulary: the 256 bytes and [PAD] [BOS] [EOS] [UNK]."""


def check_tiny_sizes(*, hidden: int, layers: int, heads: int, max_position: int, vocab_size: int,
                     intermediate: int | None = None, name: Any = lambda key: f"--{key.replace('_', '-')}") -> None:
    """Refuse sizes `init_tiny_model` cannot build a working model from, naming the option
    (`name(key)`: `--hidden` by default; a recipe names `init_model.hidden`)."""
    values = {"hidden": hidden, "layers": layers, "heads": heads, "max_position": max_position,
              "vocab_size": vocab_size, "intermediate": intermediate}
    for key, value in values.items():
        if value is None and key == "intermediate":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise AlignError(f"{name(key)} must be an integer, got {value!r}")
        if value < 1:
            raise AlignError(f"{name(key)} must be >= 1 (got {value})")
    if hidden % heads:
        raise AlignError(f"{name('hidden')} ({hidden}) must be divisible by {name('heads')} ({heads})")
    if (hidden // heads) % 2:  # rotary position embeddings rotate pairs of dimensions
        raise AlignError(f"{name('hidden')} / {name('heads')} ({hidden} / {heads} = {hidden // heads}) must be even "
                         "(rotary position embeddings rotate pairs of dimensions)")
    if vocab_size < BYTE_VOCAB:
        raise AlignError(f"{name('vocab_size')} must be >= {BYTE_VOCAB}, the 256 bytes and 4 special tokens "
                         f"(got {vocab_size})")


def init_tiny_model(out_dir: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    intermediate: int | None = None, max_position: int = 256, vocab_size: int = 260,
                    corpus: list[str] | None = None, seed: int = 0) -> Path:
    """Build a Llama-style causal LM from a config plus a byte-level tokenizer, and save both with
    `save_pretrained` so every stage loads them exactly like a downloaded checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    check_tiny_sizes(hidden=hidden, layers=layers, heads=heads, intermediate=intermediate, max_position=max_position,
                     vocab_size=vocab_size)
    out_dir = Path(out_dir)
    tokenizer = train_byte_tokenizer(corpus or ["0123456789+-=?.: abcdefghijklmnopqrstuvwxyz\n"], vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "align_init.json").write_text(json.dumps(
        {"hidden": hidden, "layers": layers, "heads": heads, "vocab_size": len(tokenizer),
         "max_position": max_position, "parameters": sum(p.numel() for p in model.parameters())}))
    if out_dir.exists():
        raise AlignError(f"output directory '{out_dir}' already exists")
    os.replace(tmp, out_dir)
    return out_dir


def load_trainable(auto_cls: Any, model_cfg: ModelConfig, lora_cfg: LoraConfig, tokenizer: Any,
                   device: torch.device, resume_from: Path | None = None, task_type: str = "CAUSAL_LM",
                   **kwargs: Any) -> Any:
    """The model a stage trains: full weights, or a fresh LoRA adapter on them; when resuming, the
    checkpoint's weights (full) or adapter (LoRA) instead."""
    full_ckpt = str(resume_from) if resume_from is not None and not lora_cfg.enabled else None
    model = load_pretrained(auto_cls, model_cfg, tokenizer, trainable=True, device=device, path=full_ckpt, **kwargs)
    if not lora_cfg.enabled:
        return model
    if resume_from is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
    else:
        model = apply_lora(model, lora_cfg, task_type)
    return model


# ----------------------------------------------------------------------------------------------
# Scalar heads: reward models and critics


def load_score_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, tokenizer: Any, device: torch.device,
                     resume_from: Path | None = None, path: str | None = None) -> "ScoreModel":
    """A trainable `AutoModelForSequenceClassification(num_labels=1)` wrapped to give per-token scores.

    Started from a causal LM (the usual case: the SFT model), the new head is drawn with std
    1/sqrt(hidden+1), small enough that initial scores sit near 0 (N+ implementation details of
    RLHF with PPO, Huang et al. 2024, following Ziegler et al. 2019).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src_cfg = model_cfg if path is None else ModelConfig(**{**model_cfg.__dict__, "path": path})
    src = resolve_model_path(src_cfg.path)
    base = adapter_base(src)
    try:
        arch = AutoConfig.from_pretrained(base or src).architectures or []
    except (OSError, ValueError) as e:
        raise AlignError(f"could not load model '{src_cfg.path}': {_first_line(e)}") from None
    # A new head is expected when the weights come from a causal LM: a new reward model or critic
    # (from a full causal LM, or from a causal LM's LoRA adapter such as a LoRA SFT run), or the
    # base under a LoRA checkpoint (whose adapter then brings the trained head). A sequence
    # classifier's adapter (a LoRA reward model) brings its trained head itself.
    headless = not any(a.endswith("ForSequenceClassification") for a in arch)
    from_lm = headless and not (base is not None and adapter_task(src) == "SEQ_CLS")
    model = load_trainable(AutoModelForSequenceClassification, src_cfg, lora_cfg, tokenizer, device, resume_from,
                           task_type="SEQ_CLS", num_labels=1,
                           new_head_ok=headless and (resume_from is None or lora_cfg.enabled))
    if resume_from is None and from_lm:
        head = _score_head(model)
        hidden = head.weight.shape[1]
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5)
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return ScoreModel(model)


@torch.no_grad()
def fold_score_offset(model: Any, offset: float) -> float:
    """Subtract `offset` from the score head's bias, where the head has one, so that the saved
    classifier's output is already the normalised score; return the amount folded (`offset` or 0).

    Most heads have no bias to fold into: every causal LM's sequence classifier in transformers
    5.24 builds `score = nn.Linear(hidden, num_labels, bias=False)` (`GenericForSequenceClassification`
    in modeling_layers.py, and GPT-2, GPT-NeoX, OPT, Bloom, Falcon, MPT... alike), and no config flag
    adds one; a bias saved anyway is dropped as an unexpected key when loaded. Those keep the whole
    offset in align_reward.json (`bias`). Align's normalisation is a mean alone (no scale), so the
    head's weight is left as it is. A critic started from a reward model whose head took the offset
    starts from the normalised score (the head as saved)."""
    head = _score_head(model.model if isinstance(model, ScoreModel) else model)
    if offset == 0.0 or getattr(head, "bias", None) is None:
        return 0.0
    head.bias -= offset
    return offset


def _score_head(model: Any) -> nn.Linear:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.score
    # peft wraps a trained head in ModulesToSaveWrapper; the active copy is the one trained.
    return head.modules_to_save[head.active_adapter] if hasattr(head, "modules_to_save") else head


class ScoreModel(nn.Module):
    """A sequence classifier read per token: forward returns (B, T) scalar scores.

    transformers' classifier pools at the last non-pad token found by comparing ids with the pad
    id; we take every position's score instead and let the caller pick positions from lengths
    (the reward model reads the last real token, the critic reads every response token).
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, T, H)
        return base.score(hidden).squeeze(-1).float()  # (B, T)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def _no_split_modules(self) -> Any:
        """The wrapped model's transformer blocks: FSDP's auto-wrap policy shards each as a unit."""
        return getattr(self.model, "_no_split_modules", None)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(*args, **kwargs)

    def merge_and_unload(self) -> Any:
        return self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last real token, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions[None, :] * attention_mask.long()).argmax(dim=1)
