"""Run the `align` CLI as one rank of a distributed run, then record what this rank ended with.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT sft CONFIG ...

Only rank 0 saves the model, so to show that every rank ends with the same weights each rank
writes its own copy of the trained model's state to `OUT/rank-<r>.safetensors`, plus
`OUT/rank-<r>.json` saying whether the process group was still alive after the command returned
(it must not be). The trained model is the one the stage unwraps from accelerate's DDP wrapper.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accelerate
import torch
from safetensors.torch import save_file

out = Path(sys.argv.pop(1))
trained: dict[str, torch.nn.Module] = {}
unwrap = accelerate.Accelerator.unwrap_model


def recording_unwrap(self: accelerate.Accelerator, model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
    inner = unwrap(self, model, *args, **kwargs)
    trained["model"] = inner
    trained["world"] = self.num_processes
    return inner


accelerate.Accelerator.unwrap_model = recording_unwrap

from align.cli import main  # noqa: E402

try:
    main(standalone_mode=False)
finally:
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    if "model" in trained:
        state = {k: v.detach().contiguous().clone() for k, v in trained["model"].state_dict().items()}
        save_file(state, str(out / f"rank-{rank}.safetensors"))
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "world": trained.get("world"),
        "process_group_alive": torch.distributed.is_available() and torch.distributed.is_initialized(),
    }))
