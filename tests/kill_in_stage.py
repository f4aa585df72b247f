"""Run the `align` CLI and SIGKILL the process the first time a given stage logs a given step.

    python tests/kill_in_stage.py MARKERS STAGE:N[,STAGE:N...] run RECIPE [options]

STAGE is the name of a run directory (a recipe stage's output: `sft`, `rm`, `ppo`, `grpo`). The
process that logs (the main one) writes `MARKERS/STAGE-N` and kills itself, uncatchably, at its
first metrics row of step >= N in that directory; the launcher (`accelerate launch`, torchrun)
then stops the other processes. A marker that exists disarms its kill, so relaunching the same
command resumes the run and goes on to the next kill, or to the end. Only the test suite uses this.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from align import runtime

markers = Path(sys.argv.pop(1))
kills = {stage: int(step) for stage, step in (item.split(":") for item in sys.argv.pop(1).split(","))}
log = runtime.MetricsLogger.log


def log_then_maybe_kill(self: runtime.MetricsLogger, step: int, metrics: dict) -> None:
    log(self, step, metrics)
    if not self.enabled:  # not the main process: it writes no metrics
        return
    stage = Path(self.file.name).parent.name
    marker = markers / f"{stage}-{kills.get(stage)}"
    if stage in kills and step >= kills[stage] and not marker.exists():
        markers.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        os.kill(os.getpid(), signal.SIGKILL)


runtime.MetricsLogger.log = log_then_maybe_kill

from align.cli import main  # noqa: E402  (after the patch, so the run sees it)

main()
