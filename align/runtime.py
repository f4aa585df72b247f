"""The trainer-side runtime every training loop uses: processes and devices, RNG, optimizers and
schedules, metrics logging, progress bars, stop signals and the non-finite guard.

The run directory's layout and file helpers are in `align/rundir.py` (torch-free); saving and
restoring checkpoints in `align/checkpoint.py`.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from align import sharding
from align.config import TrainConfig
from align.errors import AlignError
from align.rundir import RunDir, atomic_write_text, read_metrics

# ----------------------------------------------------------------------------------------------
# Processes and devices


def make_accelerator(mixed_precision: str = "auto") -> Any:
    """One Accelerator per run: one CPU process by default, DDP/FSDP/DeepSpeed under
    `accelerate launch`. `auto` picks bf16 on a GPU that supports it."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with no
    # GPU, accelerate forms a gloo process group only when told the processes are CPU ones;
    # otherwise each process silently trains alone on its share of every batch.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi_process and not _has_accelerator_device()
    sharding.check_launch()
    if cpu and sharding.requested() is not None:  # FSDP or DeepSpeed over gloo (align/sharding.py)
        accelerator = sharding.cpu_accelerator(mixed_precision)
    else:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    sharding.load_models_whole(accelerator)
    return accelerator


def _has_accelerator_device() -> bool:
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6; covers CUDA, XPU, MPS, ...
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


# ----------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(params: Any, lr: float, weight_decay: float, betas: list[float]) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases and norms are left alone, as is standard)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over every tensor, CPU and CUDA) is the same update as the default
    # per-tensor loop to float rounding, and 4x faster on CPU, where the loop is ~10% of a PPO step
    # (docs/performance.md; tests/test_perf_guards.py). HF Trainer defaults to it too.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused)


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warmup from 0 over `warmup` steps, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# A step skipped by the non-finite guard moves the schedule on without an optimizer step, on purpose
# (the schedule follows the data, so a resumed or guarded run stays on the uninterrupted one's).
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_for(total_steps), total_steps,
                                                                      cfg.min_lr_ratio))


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """lr multiplier 1 -> 0 linearly over the run (PPO's annealing, as in CleanRL and TRL)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """Appends one JSON line per logged step to metrics.jsonl (flushed each time, so it survives a
    kill) and mirrors scalars to TensorBoard when it is installed. Only the main process writes."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and run.metrics.exists():
            # Rows logged after the checkpoint will be logged again by the resumed run: drop them,
            # so the file reads as one uninterrupted run.
            kept = [json.dumps(r) + "\n" for r in read_metrics(run.metrics) if r.get("step", 0) <= resume_step]
            atomic_write_text(run.metrics, "".join(kept))
        self.file = open(run.metrics, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events logged after the checkpoint when it reads
            # the resumed run's first event, so curves do not double back (as metrics.jsonl above).
            self.tb = SummaryWriter(str(run.root / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        except ImportError:
            self.tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    return v


_open: list[Any] = []
"""Progress bars and stop requests of the run in progress, released by `release_run` on an error."""


def progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
    _open[:] = [x for x in _open if not getattr(x, "disable", False)] + [bar]  # a closed bar is disabled
    return bar


def release_run() -> None:
    """After an error stopped a run midway: close its progress bars (so the error prints on a line
    of its own) and give the signal handlers back."""
    while _open:
        item = _open.pop()
        item.__exit__() if isinstance(item, StopRequest) else item.close()


class Throughput:
    """Samples and tokens per second since the last call to `rates`."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"samples_per_sec": self.samples / dt, "tokens_per_sec": self.tokens / dt}
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0
        return out


class StopRequest:
    """SIGINT/SIGTERM set a flag instead of killing the process; the training loops check it at
    each step boundary, write a checkpoint and stop, so the run can be resumed. A second signal
    gets the default behaviour (stop at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        _open.append(self)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        _open[:] = [x for x in _open if x is not self]

    def should_stop(self, accelerator: Any) -> bool:
        """True on every process once any process was asked to stop."""
        import torch as _torch

        flag = _torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())


class Stopped(AlignError):
    """The run stopped on request after saving a checkpoint."""

    exit_code = 130


class NonFiniteGuard:
    """Counts consecutive steps whose loss or gradient norm is not finite. Such a step's update is
    skipped; after `limit` of them in a row the run stops, since the model has diverged."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def check(self, *values: Any) -> bool:
        """True when every value is finite (the update may proceed)."""
        finite = all(math.isfinite(float(v)) for v in values)
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise AlignError(f"stopping: {self.in_a_row} steps in a row with a non-finite loss or gradient "
                             "(lower the learning rate, or check the data and the reward)")
        return False
