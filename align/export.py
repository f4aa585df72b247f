"""`align export RUN OUT`: a run's final model as a portable directory that loads with
`from_pretrained(OUT)` after the run directory (and the base model) moved or were deleted, and is
ready for the hub: weights, tokenizer, generation config, a model card, and for a reward model its
`align_reward.json`.

- A full model (SFT or RL without LoRA, every reward model) is copied as it is.
- A LoRA adapter is merged into its base (`--merge`, the default: peft's `merge_and_unload`), or
  copied alone (`--adapter-only`), its `base_model_name_or_path` set to a hub id: the one it was
  trained on when that is a hub id, else `--base-model`. A local path is never written, since it
  would not exist on another machine (align's own relative `align_base.json` is dropped too).

`--push-to-hub REPO_ID` then uploads OUT with `huggingface_hub` (`HfApi.create_repo`, then
`HfApi.upload_folder`). OUT is written to a temporary directory and renamed into place, so a
failed export never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from align.card import CARD, is_hub_id, write_model_card
from align.errors import AlignError
from align.rundir import SUMMARY, RunDir, discard

DROPPED = {CARD, "align_base.json"}
"""Files of a run's model/ that are not copied: the card is written afresh for the exported form;
`align_base.json` records a path relative to the run directory."""


def check_repo_id(repo_id: str) -> None:
    """A one-line error unless `repo_id` is `name` or `namespace/name` as the hub accepts them."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AlignError(f"--push-to-hub: '{repo_id}' is not a valid hub repo id ({str(e).splitlines()[0]})") from None
    if not repo_id:
        raise AlignError("--push-to-hub: the repo id is empty")


def finished_run(path: str) -> RunDir:
    """The run directory of `path` (`<run>` or `<run>/model`), which must hold a finished model."""
    run = RunDir.of(path)
    if not run.root.is_dir():
        raise AlignError(f"RUN '{path}' does not exist")
    if not run.is_complete() or not run.model.is_dir():
        missing = SUMMARY if not run.is_complete() else "model/"
        raise AlignError(f"RUN '{path}' has no finished model (no {missing} in '{run.root}'); finish the run first "
                         "(rerun the stage, or --resume it)")
    return run


def check_out(out: Path, run: RunDir, force: bool) -> None:
    resolved = out.resolve()
    if resolved == run.model.resolve() or resolved in (run.root.resolve(), *run.root.resolve().parents):
        raise AlignError(f"OUT '{out}' is the run directory or holds it; choose a directory outside the run")
    if out.exists() and not out.is_dir():
        raise AlignError(f"OUT '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AlignError(f"OUT '{out}' exists and is not empty; choose a new directory or pass --force to replace it")


def export_model(run_path: str, out_dir: str, *, merge: bool = True, base_model: str | None = None,
                 force: bool = False) -> Path:
    """Write RUN's final model to OUT (see the module docstring); returns OUT."""
    run = finished_run(run_path)
    out = Path(out_dir).expanduser()
    check_out(out, run, force)
    src = run.model
    adapter = (src / "adapter_config.json").is_file() and not (src / "config.json").is_file()
    if base_model is not None and (merge or not adapter):
        raise AlignError("--base-model applies to --adapter-only exports of a LoRA adapter")
    if not merge and not adapter:
        raise AlignError(f"--adapter-only: the model of '{run.root}' is a full model, not a LoRA adapter; export it "
                         "without --adapter-only")
    from align.modeling import GROWN_BASE_DIR

    portable_base = None
    if adapter and not merge and (src / GROWN_BASE_DIR).is_dir():
        raise AlignError(f"--adapter-only: align grew the vocabulary of '{run.root}' by a pad token, so its adapter "
                         f"needs the grown base beside it ({GROWN_BASE_DIR}/), not the published one; export it "
                         "merged (--merge)")
    if adapter and not merge:
        recorded = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        portable_base = base_model or (recorded if is_hub_id(recorded) else None)
        if portable_base is None:
            raise AlignError(f"--adapter-only: the adapter's base model is the local directory '{recorded}', which "
                             "will not exist where the adapter is loaded; pass --base-model REPO_ID (the hub id "
                             "it is published as) or export it merged (--merge)")
        if not is_hub_id(portable_base):
            raise AlignError(f"--base-model: '{portable_base}' is not a hub repo id")

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if adapter and merge:
            merge_adapter(src, tmp)
            note = "Exported with `align export`: the LoRA adapter merged into its base model."
        else:
            shutil.copytree(src, tmp, ignore=lambda _, names: [n for n in names if n in DROPPED])
            note = ("Exported with `align export`: the LoRA adapter alone." if adapter
                    else "Exported with `align export`.")
        if portable_base is not None:
            set_adapter_base(tmp, portable_base)
        portable_reward_file(tmp)
        write_model_card(run, run.read_summary(), tmp, note=note)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        discard(out)
    os.replace(tmp, out)
    return out


def merge_adapter(src: Path, out: Path) -> None:
    """Load the adapter in `src` on its base (grown to the adapter's tokenizer when align added a
    pad token), merge it (peft `merge_and_unload`) and save the plain model with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from align.modeling import adapter_base, quiet_transformers

    quiet_transformers()
    config = json.loads((src / "adapter_config.json").read_text())
    auto_cls = AutoModelForSequenceClassification if config.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    base_path = adapter_base(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    try:
        kwargs: dict[str, Any] = {"num_labels": 1} if auto_cls is AutoModelForSequenceClassification else {}
        base = auto_cls.from_pretrained(base_path, dtype="auto", **kwargs)  # the base's own dtype
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))
        merged = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    except (OSError, ValueError) as e:
        raise AlignError(f"could not load the adapter '{src}' on its base model '{base_path}': "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def set_adapter_base(adapter_dir: Path, base: str) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def portable_reward_file(out: Path) -> None:
    """A reward model's align_reward.json names its `normalize_with` file by name, not by path."""
    from align.reward import NORMALIZATION_FILE

    path = out / NORMALIZATION_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    if isinstance(saved.get("normalized_with"), str):
        saved["normalized_with"] = Path(saved["normalized_with"]).name
    path.write_text(json.dumps(saved))


def push_to_hub(out: Path, repo_id: str, private: bool) -> str:
    """Upload OUT to the hub model repo `repo_id` (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        # private=None (not False) leaves a new repo's visibility to the account's default.
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model",
                                 commit_message="Upload a model exported by align")
    except Exception as e:  # network, authentication, permissions: whatever the hub answers, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlignError(f"exported to '{out}', but pushing it to '{repo_id}' failed: {first}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
