"""Run the `align` CLI and SIGKILL the process at one chosen moment of a checkpoint write.

    python tests/crash_points.py POINT STEP sft CONFIG [options]

POINT is where the checkpoint of optimizer step STEP (or the final model) is cut short:

    models-written   model files written into the temporary directory, trainer_state.pt not yet
    state-written    the temporary directory complete, not yet renamed to step-N
    renamed          step-N renamed into place, the `latest` pointer not yet moved to it
    pruning          `latest` moved; an older checkpoint half deleted
    final-model      the final model's files written into its temporary directory, not yet renamed

A kill is uncatchable: nothing is flushed or cleaned up, exactly as when a machine is preempted.
The patches wrap align.checkpoint and align.rundir without changing what they do; only the test suite
uses this.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from align import checkpoint, rundir

point, kill_step = sys.argv.pop(1), int(sys.argv.pop(1))


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


write_checkpoint = checkpoint.write_checkpoint


def write_then_maybe_kill(run, step: int, write_models, trainer_state, keep):  # type: ignore[no-untyped-def]
    def write(path: Path) -> None:
        write_models(path)
        if point == "models-written" and step == kill_step:
            kill()

    return write_checkpoint(run, step, write, trainer_state, keep)


torch_save = torch.save


def torch_save_then_maybe_kill(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
    torch_save(obj, f, *args, **kwargs)
    if point == "state-written" and Path(f).parent.name == f".tmp-step-{kill_step:07d}":
        kill()


atomic_write_text = checkpoint.atomic_write_text


def kill_before_pointer_moves(path: Path, text: str) -> None:
    if point == "renamed" and path.name == "latest" and text == f"step-{kill_step:07d}":
        kill()
    atomic_write_text(path, text)


rmtree = shutil.rmtree


def delete_one_file_then_kill(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    if point == "pruning" and Path(path).name.startswith(".del-step-"):
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        kill()
    rmtree(path, *args, **kwargs)


finish_model = rundir.finish_model


def finish_then_maybe_kill(run: rundir.RunDir, write_model) -> None:  # type: ignore[no-untyped-def]
    def write(path: Path) -> None:
        write_model(path)
        if point == "final-model":
            kill()

    finish_model(run, write)


checkpoint.write_checkpoint = write_then_maybe_kill
torch.save = torch_save_then_maybe_kill
checkpoint.atomic_write_text = kill_before_pointer_moves
shutil.rmtree = delete_one_file_then_kill
rundir.finish_model = finish_then_maybe_kill

from align.cli import main  # noqa: E402  (after the patches, so the stage modules import the patched names)

main()
