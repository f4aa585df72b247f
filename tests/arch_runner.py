"""Run several `align` command lines one after another in this one process, as `align run` chains
a recipe's stages in one process. tests/test_architectures.py uses it so the architecture matrix
pays python/torch/transformers start-up once rather than once per command.

    python tests/arch_runner.py JOBS.json

JOBS.json: `[{"name": ..., "argv": ["run", "recipe.yaml"], "out": "dir"}, ...]`. Each job runs
`align.cli.main(argv)` as `python -m align ARGV` would (click parses the arguments, a user error
prints its one line and exits 2); its stdout and stderr go to `<out>/stdout.txt` and
`<out>/stderr.txt` (an unexpected exception's traceback included), its exit code and CPU seconds
to `<out>/result.json`.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_job(argv: list[str], out: Path) -> int:
    from align.cli import main

    with open(out / "stdout.txt", "w", encoding="utf-8") as so, open(out / "stderr.txt", "w", encoding="utf-8") as se, \
            contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            main(argv, prog_name="align", standalone_mode=False)
            return 0
        except SystemExit as e:  # align's one-line user errors exit 2
            return e.code if isinstance(e.code, int) else 1
        except BaseException:  # a crash: the traceback, as python -m align would print it
            traceback.print_exc()
            return 1


def main() -> int:
    import transformers

    # transformers' log handler binds the stream it is created with: create it now, on the real
    # stderr, not on the first job's (closed) file.
    transformers.logging.get_logger("transformers").info("")
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        t0, c0 = time.time(), cpu_seconds()
        code = run_job(job["argv"], out)
        (out / "result.json").write_text(json.dumps({"exit": code, "wall_sec": time.time() - t0,
                                                     "cpu_sec": cpu_seconds() - c0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
