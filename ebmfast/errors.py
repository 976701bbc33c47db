"""The errors ebmfast raises on purpose, in one place.

``UsageError`` and its subclasses are mistakes a user can fix (a bad value, a missing file, an unwritable path); the
command line reports them in one line and exits with code 2. Library modules raise them; the CLI only catches them
(it depends on the library, never the reverse).
"""

from __future__ import annotations

import importlib

__all__ = [
    "UsageError",
    "CheckpointError",
    "DataNotFoundError",
    "OutputPathError",
    "MissingDependencyError",
    "DivergenceError",
    "DistributedError",
    "StopRequested",
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


class MissingDependencyError(UsageError, ImportError):
    """An optional package that a feature needs is not installed; the message names the pip extra that brings it."""


class DivergenceError(RuntimeError):
    """Training kept diverging after the allowed number of roll-backs."""


class DistributedError(RuntimeError):
    """A data-parallel run lost one of its processes: a rank died, or did not answer a collective within the
    time-out (``ebmfast.training.distributed``)."""


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
