"""Checkpoints: the one place that saves and restores a training loop's state.

A checkpoint is `<run>/checkpoints/step-N/`:

    <role>/              one model directory per trained model (`save_pretrained`): `actor/` and
                         `critic/` for PPO; a one-model stage (SFT, RM, the critic-free methods)
                         writes its model at the checkpoint's root instead, so the checkpoint
                         itself loads with `from_pretrained`, as HF Trainer's `checkpoint-N` do
    trainer_state.pt     optimizer and scheduler states, KL controller, RNG states, loop counters

It is written to `.tmp-step-N`, renamed into place, and only then does `latest` move to it; the
oldest checkpoints beyond `keep` are deleted by rename-then-delete (`rundir.discard`). A kill at
any moment leaves `latest` on a complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError
from align.rundir import LATEST, TRAINER_STATE, RunDir, atomic_write_text, discard

MANIFEST = "manifest.json"
"""Written into every checkpoint last: the size of each of its files, to verify it before a resume."""

ROOT_ROLE = "model"
"""The role of a one-model stage: saved at the checkpoint's root."""


def model_dir(checkpoint: Path | None, role: str = ROOT_ROLE) -> Path | None:
    """Where `role`'s weights live in `checkpoint` (None when there is no checkpoint)."""
    if checkpoint is None:
        return None
    return checkpoint if role == ROOT_ROLE else checkpoint / role


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    # weights_only=False: the state holds python/numpy RNG states, which are not plain tensors.
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)


@dataclass
class Checkpointer:
    """Saves `step-N` checkpoints of a run and restores the newest one.

    `models`: role -> (model, tokenizer), the unwrapped models to save; `stateful`: name -> an
    object with `state_dict()`/`load_state_dict()` (optimizers, schedulers, KL controller). The
    loop's own counters travel as the plain dict `state`, and RNG states are always included, so a
    resumed run draws the same samples as an uninterrupted one."""

    run: RunDir
    keep: int
    accelerator: Any
    models: dict[str, tuple[Any, Any]]
    stateful: dict[str, Any]
    prepared: dict[str, Any] = field(default_factory=dict)
    """role -> the prepared (possibly sharded) model of `models[role]`: under FSDP or DeepSpeed every
    process gathers its full state dict, which the main process writes (align/sharding.py)."""
    optimizers: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """name in `stateful` -> (prepared model, its prepared optimizer): under FSDP2 saved whole,
    under DeepSpeed one ZeRO partition file per process; otherwise saved like any stateful object."""

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write `step-N`: the main process writes it, after every process took part in gathering
        sharded states (and, under DeepSpeed, wrote its optimizer partitions into it)."""
        from accelerate.utils import gather_object

        from align import sharding
        from align.modeling import save_model
        from align.runtime import rng_state

        acc = self.accelerator
        # Each process's own RNG states: the processes sample different prompts, so their streams
        # part ways, and a resumed process must continue its own.
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        full = sharding.full_state_dicts(acc, self.prepared)
        whole = sharding.optimizer_states(acc, self.optimizers)
        apart = sharding.sharded_names(acc, self.optimizers)
        partitioned = sharding.strategy(acc) == sharding.DEEPSPEED and bool(self.optimizers)
        if acc.is_main_process:
            trainer_state = {name: obj.state_dict() for name, obj in self.stateful.items() if name not in apart}
            trainer_state.update(whole)
            trainer_state.update(rng=rngs[0], rng_per_process=rngs, state=state)

            def write_models(path: Path) -> None:
                for role, (model, tokenizer) in self.models.items():
                    save_model(model, tokenizer, model_dir(path, role), state_dict=full.get(role), standalone=False)
                if partitioned:  # the temporary directory exists: every process writes its partitions
                    acc.wait_for_everyone()
                    sharding.write_optimizer_partitions(acc, self.optimizers, path)
                    acc.wait_for_everyone()

            write_checkpoint(self.run, step, write_models, trainer_state, self.keep)
        elif partitioned:
            acc.wait_for_everyone()
            sharding.write_optimizer_partitions(acc, self.optimizers, temporary_dir(self.run, step))
            acc.wait_for_everyone()
        acc.wait_for_everyone()

    def restore(self, checkpoint: Path) -> dict[str, Any]:
        """Load every stateful object's state and the RNG states from `checkpoint` (whose model
        weights the caller loaded, from `model_dir(checkpoint, role)`); return the loop counters."""
        from align import sharding
        from align.runtime import set_rng_state

        saved = load_trainer_state(checkpoint)
        apart = sharding.sharded_names(self.accelerator, self.optimizers)
        for name, obj in self.stateful.items():
            if name not in apart:
                obj.load_state_dict(saved[name])
        sharding.load_optimizer_states(self.accelerator, self.optimizers, saved, checkpoint)
        rank, per_process = self.accelerator.process_index, saved.get("rng_per_process", [])
        set_rng_state(per_process[rank] if rank < len(per_process) else saved["rng"])
        return saved["state"]


def temporary_dir(run: RunDir, step: int) -> Path:
    """Where `write_checkpoint` assembles `step-N` before renaming it into place."""
    return run.checkpoints / f".tmp-step-{step:07d}"


def write_checkpoint(run: RunDir, step: int, write_models: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step-N` atomically, move `latest` to it, keep the newest `keep`."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoints / f"step-{step:07d}"
    tmp = temporary_dir(run, step)
    for stale in run.checkpoints.glob(".*-step-*"):  # left by a kill: never pointed at, safe to drop
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        write_models(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_text(tmp / MANIFEST, json.dumps(sizes, indent=1))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            intact = run.latest_checkpoint()
            raise AlignError(f"disk full while writing checkpoint {final.name} in {run.checkpoints}; "
                             f"{'the last checkpoint, ' + intact.name + ', is intact' if intact else 'no checkpoint was lost'}"
                             "; free space and resume with --resume") from None
        raise
    if final.exists():  # written by a run killed before `latest` moved to it
        discard(final)
    os.replace(tmp, final)
    atomic_write_text(run.checkpoints / LATEST, final.name)  # moves only after a complete write
    existing = sorted(p for p in run.checkpoints.glob("step-*") if p.is_dir())
    for old in existing[: max(0, len(existing) - keep)]:
        if old != final:
            discard(old)
    return final


def verify(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (None when it can): a file missing or of another
    size than the manifest recorded, or a trainer state that does not load."""
    if not (checkpoint / TRAINER_STATE).is_file():
        return f"{checkpoint.name}: {TRAINER_STATE} is missing"
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{checkpoint.name}: {MANIFEST} is damaged"
        for name, size in sizes.items():
            f = checkpoint / name
            if not f.is_file():
                return f"{checkpoint.name}: {name} is missing"
            if f.stat().st_size != size:
                return f"{checkpoint.name}: {name} is {f.stat().st_size} bytes, {size} when saved"
    try:
        load_trainer_state(checkpoint)
    except Exception as e:  # any unpickling failure: the file is damaged
        return f"{checkpoint.name}: {TRAINER_STATE} does not load ({type(e).__name__})"
    return None


def resume_point(run: RunDir) -> Path | None:
    """The checkpoint a resumed run continues from: the one `latest` points at when it is intact,
    else the newest intact one before it (saying which, and why). None when the run never wrote
    a checkpoint; a one-line error when checkpoints exist and none is intact (never a silent
    restart from step 0)."""
    if not run.has_checkpoints():
        return None
    pointed = run.checkpoints / (run.checkpoints / LATEST).read_text().strip()
    def number(p: Path) -> int:  # step-0000004 (ours), checkpoint-4 (TRL's)
        tail = p.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    older = sorted((p for p in run.checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and 0 <= number(p) < number(pointed)), key=number, reverse=True)
    problems = []
    for candidate in [pointed, *older]:
        problem = verify(candidate) if candidate.is_dir() else f"{candidate.name} does not exist"
        if problem is None:
            if problems:
                print(f"resume: {'; '.join(problems)}: resuming from {candidate.name} instead", flush=True)
            return candidate
        problems.append(problem)
    raise AlignError(f"{run.checkpoints}: no intact checkpoint to resume from ({'; '.join(problems)}); "
                     "remove the run directory to start over")
