"""The errors ebmfast raises on purpose, in one place.

``UsageError`` and its subclasses are mistakes a user can fix (a bad value, a missing file, an unwritable path); the
command line reports them in one line and exits with code 2. Library modules raise them; the CLI only catches them
(it depends on the library, never the reverse).
"""

from __future__ import annotations

import errno
import importlib
import os

__all__ = [
    "UsageError",
    "CheckpointError",
    "DataNotFoundError",
    "OutputPathError",
    "MissingDependencyError",
    "DivergenceError",
    "DistributedError",
    "StopRequested",
    "NonFiniteError",
    "WRITE_FAULTS",
    "write_failure",
    "require",
]


class UsageError(Exception):
    """A bad value the user gave; reported in one line, exit code 2."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint file that is missing, truncated, not ours, from a newer ebmfast, or for another model."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


class OutputPathError(UsageError, ValueError):
    """An output path that cannot be written (checked before any work starts)."""


# Faults of the machine or of the path a user gave, met while writing a file: each becomes one line naming the path and
# the cause (exit 2), never a traceback. The hints say what to do about them.
WRITE_FAULTS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EFBIG: "file too large for the file system or for this process's file-size limit (ulimit -f)",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.ENAMETOOLONG: "a file name is longer than the file system allows (usually 255 bytes per name)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def write_failure(exc: BaseException, path: str | os.PathLike | None = None, what: str = "") -> OutputPathError | None:
    """The one-line ``OutputPathError`` for a write that failed with one of ``WRITE_FAULTS`` (naming ``path``, else
    the file the error names), or None for any other error (a bug to show in full). The ``OSError`` may also be the
    cause or context of ``exc`` (``torch.save`` re-raises a failed write as a ``RuntimeError``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
            target = path if path is not None else (exc.filename or "a file")
            cause = WRITE_FAULTS[exc.errno]
            return OutputPathError(f"cannot write {what + ' ' if what else ''}{target}: {cause} ([Errno {exc.errno}])")
        exc = exc.__cause__ or exc.__context__
    return None


class MissingDependencyError(UsageError, ImportError):
    """An optional package that a feature needs is not installed; the message names the pip extra that brings it."""


class DivergenceError(RuntimeError):
    """Training kept diverging after the allowed number of roll-backs."""


class DistributedError(RuntimeError):
    """A data-parallel run lost one of its processes: a rank died, or did not answer a collective within the
    time-out (``ebmfast.training.distributed``)."""


class NonFiniteError(FloatingPointError):
    """A Langevin chain produced NaN or inf (``LangevinSampler(check_finite=True)``); the message names the samples
    and, where known, the step. Not a usage error: the command line reports it in one line with exit code 1."""


class StopRequested(Exception):
    """A stop request (SIGINT/SIGTERM in training) seen between the chunks of a long Langevin chain: the chain gave up
    and put its noise counter back where the call started, so redoing the call draws the same noise
    (``LangevinSampler.stop_check``)."""


def require(module: str, purpose: str, package: str | None = None, extra: str = "train"):
    """``importlib.import_module(module)``, or ``MissingDependencyError`` naming ``purpose``, the missing package and
    the ebmfast extra that installs it. Optional packages are imported only in the functions that need them, so the
    sampler works without any of them."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the package {name!r}, which is not installed ({exc}); install it with "
            f"pip install 'ebmfast[{extra}]' (or pip install {name})"
        ) from None
