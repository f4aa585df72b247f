"""The run directory: where every stage, `align eval` and `align compare` read and write. Torch-free.

Every training stage writes the same layout:

    <output_dir>/config.yaml          resolved config, written before the first step
    <output_dir>/inputs.json          content hashes of every input file (data, prompts), for resume
    <output_dir>/provenance.json      package versions, CPU and its vector extensions, threads, git commit
    <output_dir>/metrics.jsonl        one JSON object per logged step, appended line by line
    <output_dir>/checkpoints/step-N/  the model(s) of that step + trainer_state.pt (align/checkpoint.py)
    <output_dir>/checkpoints/latest   name of the newest complete checkpoint
    <output_dir>/model/               the final model, loadable with from_pretrained, and its card (README.md)
    <output_dir>/summary.json         written last: its presence means the run is complete

Files are written to a temporary name and renamed into place (`atomic_write_text`), so a killed
run never leaves a file that parses but is partial. `RunDir.of(path)` finds the run directory of a
model path (`<run>`, `<run>/model` or `<run>/checkpoints/step-N`): the one place that knows how a
model path relates to its run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CONFIG = "config.yaml"
INPUTS = "inputs.json"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model"
SUMMARY = "summary.json"
TRAINER_STATE = "trainer_state.pt"


@dataclass(frozen=True)
class RunDir:
    """One stage's output directory and the names of everything in it."""

    root: Path

    @classmethod
    def of(cls, model_path: str | Path) -> "RunDir":
        """The run directory a model path belongs to: `<run>` for `<run>/model` and for
        `<run>/checkpoints/step-N`, else the path itself (which may be no run of ours at all: check
        `config.is_file()`)."""
        p = Path(model_path).expanduser()
        if p.name == MODEL:
            return cls(p.parent)
        if p.parent.name == CHECKPOINTS:
            return cls(p.parent.parent)
        return cls(p)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def inputs(self) -> Path:
        return self.root / INPUTS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    def is_complete(self) -> bool:
        return self.summary.is_file()

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` points at, if it holds its trainer state."""
        pointer = self.checkpoints / LATEST
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None

    def has_checkpoints(self) -> bool:
        """Whether any checkpoint was ever pointed at (an interrupted run), intact or not."""
        return (self.checkpoints / LATEST).is_file()

    def read_config(self) -> dict[str, Any]:
        """The run's resolved config as a dict; a damaged file is a one-line error naming it."""
        from align.runinfo import read_run_config

        return read_run_config(self.config)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text(encoding="utf-8"))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics) if self.metrics.is_file() else []


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync'ed and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively: JSON has no NaN or
    Infinity, and most readers reject Python's `Infinity` extension."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=2, default=float, allow_nan=False))


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    """Mark the run complete. Written last, atomically; first the model card (`model/README.md`,
    align/card.py), which quotes this summary's metrics, so a complete run always has its card."""
    if run.model.is_dir():
        from align.card import write_model_card

        write_model_card(run, json_safe(summary))
    write_json(run.summary, summary)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; a final line cut short by a kill is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def discard(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves part of it under its own name: it is
    renamed to `.del-<name>` (atomic) first, then deleted."""
    trash = path.with_name(f".del-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def finish_model(run: RunDir, write_model: Callable[[Path], None]) -> None:
    """Write the final model to a temporary directory and rename it into place."""
    tmp = run.root / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model(tmp)
    if run.model.exists():
        discard(run.model)
    os.replace(tmp, run.model)
    reanchor_adapter(run.model)


ADAPTER_BASE_FILE = "align_base.json"
"""Beside an adapter align saved: `{"relative": <its base, relative to the adapter directory>}`."""


def reanchor_adapter(model_dir: Path) -> None:
    """Point an adapter's `base_model_name_or_path` (absolute: transformers and peft resolve a
    relative one against the working directory) at its base as recorded relative to the adapter
    directory, after the directory moved (the final model is written under a temporary name)."""
    side, config_path = model_dir / ADAPTER_BASE_FILE, model_dir / "adapter_config.json"
    if not (side.is_file() and config_path.is_file()):
        return
    base = (model_dir / json.loads(side.read_text())["relative"]).resolve()
    config = json.loads(config_path.read_text())
    if base.is_dir() and config.get("base_model_name_or_path") != str(base):
        config["base_model_name_or_path"] = str(base)
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Opening a run: checks, lock, recorded config and inputs


def prepare_run_dir(output_dir: str, cfg: Any, resume: bool, is_main: bool, force: bool = False,
                    dry_run: bool = False) -> RunDir:
    """Check the output directory before any compute, lock it, and record the config and inputs.

    A finished run is never overwritten, and an interrupted one only continues with `--resume`,
    with the config and input files it started with (unless `force`): a resumed run must be the
    run that would have happened. A `dry_run` makes the same checks and writes nothing.
    """
    from align.config import save_config, to_dict
    from align.errors import AlignError

    run = RunDir(Path(output_dir).expanduser())
    for key, path in input_dirs(to_dict(cfg)).items():
        if Path(path).expanduser().resolve() == run.root.resolve():
            raise AlignError(f"output_dir '{run.root}' is the directory the run reads its model from ({key}); "
                             "choose another output_dir")
    if is_main and not dry_run and run.root.is_dir():
        lock_run(run)  # before looking inside: another run may be writing it right now
    if run.is_complete():
        raise AlignError(f"output_dir '{run.root}' already holds a finished run; choose another directory or remove it")
    interrupted = run.has_checkpoints()
    if not resume and interrupted:
        raise AlignError(f"output_dir '{run.root}' holds checkpoints of an interrupted run; pass --resume to continue it "
                         "or choose another directory")
    hashes = input_hashes(to_dict(cfg))
    if resume and interrupted:
        changed = []
        if run.config.is_file():
            # A run directory may have been moved: where it lives is not part of what it computes.
            changed = [c for c in config_changes(run.read_config(), to_dict(cfg)) if not c.startswith("output_dir:")]
        # What the checkpoint restores (optimizer and KL-controller states, RNG) would silently win
        # over a changed value: refused even with --force, so config.yaml never says one thing
        # while the run does another.
        restored = [c for c in changed if c.split(":")[0].rsplit(".", 1)[-1] in RESTORED_KEYS]
        if restored:
            raise AlignError(f"cannot resume '{run.root}' with a changed {restored[0]}: the checkpoint restores the "
                             "optimizer, KL controller and RNG states, which keep the old value even with --force; "
                             "start a new run to change it")
        if run.inputs.is_file():
            old = json.loads(run.inputs.read_text(encoding="utf-8"))
            changed += [f"{path}: content changed since the run started" for path, digest in hashes.items()
                        if path in old and old[path] != digest]
        if changed and not force:
            raise AlignError(f"cannot resume '{run.root}' with a changed config or input ({'; '.join(changed[:5])}); "
                             "pass --force to resume anyway")
    if dry_run:
        existing = next(p for p in (run.root.absolute(), *run.root.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise AlignError(f"output_dir '{run.root}' is not writable ('{existing}' is not a writable directory)")
        return run
    if is_main:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
            probe = run.root / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise AlignError(f"output_dir '{run.root}' is not writable: {e.strerror}") from None
        lock_run(run)
        if run.metrics.exists() and (not resume or not interrupted):
            # A run that never reached a checkpoint starts over, even with --resume. (A resumed run
            # drops the rows logged after its checkpoint in MetricsLogger.)
            run.metrics.unlink()
        save_config(cfg, run.config)
        write_json(run.inputs, hashes)
        from align.provenance import provenance

        write_json(run.root / PROVENANCE, provenance())
    return run


MODEL_KEYS = ("model.path", "model.tokenizer", "reward.model", "critic.path", "reference")


def input_dirs(config: dict[str, Any]) -> dict[str, str]:
    """The model directories a config reads (`MODEL_KEYS` that are set)."""
    out = {}
    for key in MODEL_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            out[key] = node
    return out


def input_hashes(config: dict[str, Any]) -> dict[str, str]:
    """sha256 of every existing file a config names (data, prompts, normalisation data): a file
    rewritten at the same path is a different input, which a resumed run must notice."""
    import hashlib

    found: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "output_dir":
                    visit(v, k)
        elif isinstance(value, list):
            for v in value:
                visit(v, key)
        elif isinstance(value, str) and value and os.path.isfile(value):
            digest = hashlib.sha256()
            with open(value, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            found[str(Path(value).absolute())] = digest.hexdigest()

    visit(config, "")
    return found


RESTORED_KEYS = ("lr", "weight_decay", "adam_betas", "kl_coef", "seed")
"""Config keys whose value a resumed run takes from the checkpoint's state, not from the config."""

LOCK = ".lock"
_held: dict[Path, Any] = {}
"""Open lock files of the run directories this process holds, by absolute path."""


def lock_run(run: RunDir) -> None:
    """Hold an exclusive lock on the run directory for the life of this process (or until
    `release_locks`): two runs writing one directory would leave one's config, the other's model
    and interleaved metrics. The lock is an `flock` on `<run>/.lock`, so the operating system
    releases it when the process dies, however it dies: a stale lock cannot exist. The file holds
    the holder's pid and host, for the error message."""
    import fcntl
    import socket

    from align.errors import AlignError

    key = run.root.absolute()
    if key in _held:
        return
    f = open(run.root / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise AlignError(f"output_dir '{run.root}' is in use by {holder}; wait for that run to end or choose "
                         "another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    _held[key] = f


def release_locks() -> None:
    """Release every run-directory lock this process holds (at the end of a command or stage)."""
    while _held:
        _, f = _held.popitem()
        f.close()
