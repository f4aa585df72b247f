"""Run the `align` CLI and SIGKILL the process as soon as it has logged step N.

    python tests/kill_after_step.py N sft CONFIG [options]

A real, uncatchable interruption at a known step (nothing is flushed or cleaned up), so a test can
resume the run and compare it with an uninterrupted one. Only the test suite uses this.
"""

from __future__ import annotations

import os
import signal
import sys

from align import runtime

kill_at = int(sys.argv.pop(1))
log = runtime.MetricsLogger.log


def log_then_kill(self: runtime.MetricsLogger, step: int, metrics: dict) -> None:
    log(self, step, metrics)
    if step >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


runtime.MetricsLogger.log = log_then_kill

from align.cli import main  # noqa: E402  (after the patch, so the run sees it)

main()
