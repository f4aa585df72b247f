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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from align import sharding
from align.config import FLOORED_SCHEDULES, OptimizerConfig
from align.errors import AlignError, ConfigError
from align.rundir import RunDir, atomic_write_text, read_metrics

# ----------------------------------------------------------------------------------------------
# Processes and devices


def make_accelerator(mixed_precision: str = "auto", report_to: list[str] | tuple[str, ...] = (),
                     run_root: str | Path | None = None, key: str = "train.report_to") -> Any:
    """One Accelerator per run: one CPU process by default, DDP/FSDP/DeepSpeed under
    `accelerate launch`. `auto` picks bf16 on a GPU that supports it. `report_to` names
    accelerate's trackers (`log_with`); TensorBoard writes under `<run_root>/tensorboard`. The
    trackers start with the run's MetricsLogger; a tracker whose package is missing is an error
    naming `key`, before anything is loaded. Off a live terminal the libraries' own progress bars
    (datasets' maps in TRL's data preparation, hub downloads) are turned off: in a log they are
    lines of carriage returns, and the stage prints its own progress lines."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    check_trackers(report_to, key)
    if not live_terminal():
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    # Launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with no
    # GPU, accelerate forms a gloo process group only when told the processes are CPU ones;
    # otherwise each process silently trains alone on its share of every batch.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi_process and not _has_accelerator_device()
    project = None
    if report_to:
        root = Path(run_root if run_root is not None else ".")
        project = ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tensorboard"))
    trackers: dict[str, Any] = {"log_with": list(report_to) or None, "project_config": project}
    sharding.check_launch()
    if cpu and sharding.requested() is not None:  # FSDP or DeepSpeed over gloo (align/sharding.py)
        accelerator = sharding.cpu_accelerator(mixed_precision, **trackers)
    else:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **trackers)
    sharding.load_models_whole(accelerator)
    return accelerator


TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
                   "mlflow": ("mlflow",)}
"""The package each tracker needs (accelerate drops a tracker whose package is missing without a word)."""


def check_trackers(report_to: list[str] | tuple[str, ...], key: str) -> None:
    import importlib.util

    missing = [n for n in report_to if not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[n])]
    if missing:
        raise ConfigError(f"config key '{key}' names {', '.join(missing)}, which is not installed: "
                          f"pip install \"align[trackers]\" (or set {key}=[])")


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
    """lr multiplier of `lr_scheduler_type: warmup_cosine`: linear warmup over `warmup` steps whose
    first step is already at 1 / warmup (no step spent at lr 0), then cosine decay to `min_ratio`.

    After the warmup it is HF's `cosine_with_min_lr` (`min_lr_rate = min_ratio`) to the last bit,
    so with no warmup the two are the same schedule (tests/test_schedules.py); HF's warmup is
    s / warmup instead, starting at 0. It stays align's default for SFT and the reward model so
    that earlier results reproduce exactly."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# A step skipped by the non-finite guard moves the schedule on without an optimizer step, on purpose
# (the schedule follows the data, so a resumed or guarded run stays on the uninterrupted one's).
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimizerConfig, total_steps: int) -> Any:
    """The schedule `o.lr_scheduler_type` over `total_steps` steps: align's `warmup_cosine`, or
    `transformers.get_scheduler` with the warmup of `warmup_steps`/`warmup_ratio`, the
    `lr_scheduler_kwargs`, and `min_lr_ratio` as the type's floor argument (FLOORED_SCHEDULES)."""
    warmup = o.warmup_for(total_steps)
    if o.lr_scheduler_type == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps, o.min_lr_ratio))
    from transformers import get_scheduler

    return get_scheduler(o.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=scheduler_kwargs(o))


def scheduler_kwargs(o: OptimizerConfig) -> dict[str, Any]:
    """get_scheduler's `scheduler_specific_kwargs`: `lr_scheduler_kwargs`, plus `min_lr_ratio` under
    the type's own name for its floor when the kwargs set none."""
    kwargs = dict(o.lr_scheduler_kwargs)
    floor = FLOORED_SCHEDULES.get(o.lr_scheduler_type)
    if floor is not None and not {"min_lr", "min_lr_rate", "min_lr_ratio"} & set(kwargs):
        kwargs[floor] = o.min_lr_ratio
    return kwargs


def check_scheduler(o: OptimizerConfig, total_steps: int, section: str, lrs: tuple[float, ...] = ()) -> None:
    """Build the schedule once on a throwaway optimizer (at each of `lrs`, default `o.lr`), so that a
    warmup as long as the run or `lr_scheduler_kwargs` that do not fit the type stop the command
    with one line naming the key, before any model is loaded."""
    warmup = o.warmup_for(total_steps)
    if warmup >= total_steps:
        given = f"{section}.warmup_ratio' ({o.warmup_ratio}: {warmup} steps)" if o.warmup_ratio is not None \
            else f"{section}.warmup_steps' ({o.warmup_steps})"
        raise AlignError(f"config key '{given} must be shorter than the run ({total_steps} steps)")
    for lr in lrs or (o.lr,):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        try:
            make_scheduler(probe, o, total_steps)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key '{section}.lr_scheduler_kwargs' ({o.lr_scheduler_kwargs}) does not fit "
                              f"{section}.lr_scheduler_type '{o.lr_scheduler_type}': {e}") from None


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """Appends one JSON line per logged step to metrics.jsonl (flushed each time, so it survives a
    kill), the run's record, and sends the same numbers to the trackers of `accelerator`
    (`report_to`, through `accelerator.log`). Only the main process writes."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int | None = None, accelerator: Any = None,
                 config: Any = None):
        self.enabled = enabled
        self.accelerator = None
        if not enabled:
            return
        if resume_step is not None and run.metrics.exists():
            # Rows logged after the checkpoint will be logged again by the resumed run: drop them,
            # so the file reads as one uninterrupted run.
            kept = [json.dumps(r) + "\n" for r in read_metrics(run.metrics) if r.get("step", 0) <= resume_step]
            atomic_write_text(run.metrics, "".join(kept))
        self.file = open(run.metrics, "a", encoding="utf-8")
        _open.append(self)
        if accelerator is not None and accelerator.log_with:
            start_trackers(accelerator, run, config, resume_step)
            self.accelerator = accelerator

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.accelerator is not None:
            # The numbers of the row as written (a non-finite value is a string there, and is left out).
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                                  and not isinstance(v, bool)}, step=step)

    def close(self) -> None:
        if self.enabled and not self.file.closed:
            self.file.close()
            if self.accelerator is not None:
                # Each tracker's own finish; not accelerator.end_training(), which also ends the
                # process group that later stages of `align run` still use.
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            _open[:] = [x for x in _open if x is not self]


def start_trackers(accelerator: Any, run: RunDir, config: Any, resume_step: int | None) -> None:
    """`accelerator.init_trackers` with the run's config as hyper-parameters. Project `align`; the
    run is named after its directory (`<parent>/<name>`). A resumed run continues TensorBoard's
    event file (purge_step drops the events logged after the checkpoint, as metrics.jsonl does)
    and trackio's run of the same name; wandb and MLflow start a new run from the resumed step."""
    import dataclasses

    name = f"{run.root.parent.name}/{run.root.name}"
    init_kwargs = {
        "tensorboard": {"purge_step": resume_step + 1} if resume_step is not None else {},
        # wandb writes its files into the run directory unless WANDB_DIR says otherwise.
        "wandb": {"name": name, **({} if os.environ.get("WANDB_DIR") else {"dir": str(run.root)})},
        "trackio": {"name": name, **({"resume": "allow"} if resume_step is not None else {})},
        "mlflow": {"run_name": name},
    }
    flat = _flatten(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else None
    try:
        accelerator.init_trackers("align", config=flat, init_kwargs=init_kwargs)
    except Exception as e:  # a tracker's own failure (no login, unreachable server): one line, not its traceback
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AlignError(f"report_to: a tracker did not start ({type(e).__module__.split('.')[0]}: {message})") \
            from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted key: int, float, str or bool}, as every tracker takes hyper-parameters."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    return v


_open: list[Any] = []
"""Progress bars, metrics loggers and stop requests of the run in progress, released by
`release_run` on an error."""


def progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal; plain lines (`PlainProgress`) where a bar cannot be drawn: output
    that is not a terminal (a CI log, a file), `CI` set, or a terminal of zero width (there tqdm
    draws nothing at all)."""
    if enabled and not live_terminal():
        bar: Any = PlainProgress(total, initial, desc)
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
    _open[:] = [x for x in _open if not getattr(x, "disable", False)] + [bar]  # a closed bar is disabled
    return bar


def live_terminal() -> bool:
    """stderr is a terminal with some width, and not a CI job's (CI=true, as GitHub, GitLab and most
    CI services set it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty():
        return False
    columns = os.environ.get("COLUMNS", "")
    if columns.strip().lstrip("-").isdigit():
        return int(columns) > 0
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:
        return False


class PlainProgress:
    """The progress of a run as whole lines on stderr, for logs: `sft: step 20/200 (10%), 0:00:12
    elapsed, 1.67 steps/s, ETA 0:01:48, loss=0.4231`. A line is due at the first step, whenever
    another tenth of the run is done or `every_sec` has passed since the last line; it is printed
    when the step's values arrive (`set_postfix`) or at the next step, and a last line at the end
    carries the final values. The part of tqdm's interface the loops use (update, set_postfix,
    write, close)."""

    def __init__(self, total: int, initial: int, desc: str, every_sec: float = 60.0):
        self.total, self.n, self.desc, self.every_sec = total, initial, desc, every_sec
        self.start_n, self.t0 = initial, time.perf_counter()
        self.last_n, self.last_t = initial, self.t0
        self.postfix = self.printed_postfix = ""
        self.due = False
        self.disable = False

    def update(self, n: int = 1) -> None:
        if self.due:
            self._line()
        self.n += n
        tenth = max(1, self.total // 10)
        self.due = (self.last_n == self.start_n or self.n // tenth > self.last_n // tenth
                    or time.perf_counter() - self.last_t >= self.every_sec)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.due:
            self._line()

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if not self.disable:
            if self.due or self.n != self.last_n or self.postfix != self.printed_postfix:
                self._line()
            self.disable = True

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n // max(1, self.total)}%)",
                 f"{_clock(elapsed)} elapsed", f"{rate:.2f} steps/s"]
        if rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.last_n, self.last_t, self.printed_postfix, self.due = self.n, now, self.postfix, False


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def release_run() -> None:
    """After an error stopped a run midway: close its progress bars (so the error prints on a line
    of its own) and its metrics logger (ending its trackers' runs), and give the signal handlers back."""
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
