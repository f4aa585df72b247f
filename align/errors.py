"""User-facing errors.

An `AlignError` is a mistake in what the user gave us (a config key, a data line, a path). The CLI
prints it as one line, `error: <message>`, and exits with code 2; it never shows a traceback.
Anything else that escapes is a bug in align and keeps its traceback.
"""

from __future__ import annotations


class AlignError(Exception):
    """A user error, reported as one line naming the file, line or key at fault."""

    exit_code = 2


class ConfigError(AlignError):
    """A bad config key or value."""


class DataError(AlignError):
    """A bad data file, line or field. Several problems in one file are joined into one message."""

    def __init__(self, problems: list[str], limit: int = 10):
        shown = problems[:limit]
        more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
        super().__init__("; ".join(shown) + more)
        self.problems = problems
