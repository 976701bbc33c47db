"""The errors ebmfast raises on purpose, in one place.

``UsageError`` and its subclasses are mistakes a user can fix (a bad value, a missing file, an unwritable path); the
command line reports them in one line and exits with code 2. Library modules raise them; the CLI only catches them
(it depends on the library, never the reverse).
"""

from __future__ import annotations

__all__ = ["UsageError", "CheckpointError", "DataNotFoundError", "OutputPathError", "DivergenceError"]


class UsageError(Exception):
    """A bad value the user gave; reported in one line, exit code 2."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint file that is missing, truncated, not ours, from a newer ebmfast, or for another model."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


class OutputPathError(UsageError, ValueError):
    """An output path that cannot be written (checked before any work starts)."""


class DivergenceError(RuntimeError):
    """Training kept diverging after the allowed number of roll-backs."""
