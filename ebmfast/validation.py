"""Input checks shared by the public API: each error says what was expected and what was given."""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import TypeVar

import torch

from .errors import NonFiniteError

T = TypeVar("T")

__all__ = [
    "capturing",
    "check_samples",
    "check_finite_result",
    "check_positive_int",
    "check_positive_float",
    "check_nonneg_float",
    "check_clamp",
    "check_choice",
    "check_probability",
    "check_shape",
    "FLOAT32_MAX",
]


def capturing(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream: no host synchronisation is allowed then,
    so value checks (finiteness) are skipped; shape/dtype checks still run."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_samples(x: torch.Tensor, name: str = "x", *, finite: bool = True) -> None:
    """A batch of samples: a floating-point tensor with a batch dimension, finite values (the finiteness check
    waits for the device; it is skipped during CUDA-graph capture)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}; convert it with .to_dense()")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values); create it on 'cpu' or 'cuda'")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and at least one feature dimension "
            f"(shape (N, ...)), got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got an empty batch {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64/float16/bfloat16), got {x.dtype}")
    if finite and not capturing(x) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf)")


def check_finite_result(
    out: torch.Tensor, steps: int, trajectory: torch.Tensor | None = None, energy_bad_step: torch.Tensor | None = None
) -> None:
    """The state a chain returned holds only finite values (and, where the backend watched it, every step's energy was
    finite: ``energy_bad_step``, per sample the first bad step, 1-based, 0 for none), else ``NonFiniteError`` naming
    the samples and the first bad step when the energy or a trajectory shows it. One read of the device per call
    (skipped during capture)."""
    if capturing(out):
        return
    bad = ~torch.isfinite(out).flatten(1).all(1)
    if energy_bad_step is not None:
        bad = bad | (energy_bad_step > 0)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    when = f"after the chain of {steps} steps"
    if energy_bad_step is not None and bool((energy_bad_step > 0).any()):
        when = f"first at step {int(energy_bad_step[energy_bad_step > 0].min())} of {steps}"
    elif trajectory is not None:
        per_step = (~torch.isfinite(trajectory)).flatten(2).any(2).any(1)  # (steps,): any sample non-finite
        when = f"first at step {int(per_step.nonzero()[0]) + 1} of {steps}"
    raise NonFiniteError(
        f"the Langevin chain met NaN or inf in {len(rows)} of {out.shape[0]} samples (rows {shown}), {when}: "
        "the energy model returned a non-finite energy or gradient there (check_finite=True)"
    )


def check_int(value: object, name: str, minimum: int = 1, note: str = "") -> int:
    """An integer (not a bool) of at least ``minimum``; ``note`` says why, in the error message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}{note}, got {value!r}")
    return int(value)


def check_positive_int(value: object, name: str) -> int:
    return check_int(value, name, 1)


FLOAT32_MAX = 3.4028234663852886e38


def _real(value: object, name: str) -> float:
    """A finite real number within float32's range (the kernels and default tensors are float32)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if abs(v) > FLOAT32_MAX:
        raise ValueError(f"{name} must lie within float32's range (|value| <= 3.4e38), got {value!r}")
    return v


def check_positive_float(value: object, name: str) -> float:
    v = _real(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def check_nonneg_float(value: object, name: str) -> float:
    v = _real(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_clamp(clamp: object) -> tuple[float, float]:
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise ValueError(f"clamp must be a pair (low, high), got {clamp!r}") from None
    lo, hi = _real(lo, "clamp[0]"), _real(hi, "clamp[1]")
    if not lo < hi:
        raise ValueError(f"clamp must satisfy low < high, got {clamp!r}")
    return lo, hi


def check_probability(value: object, name: str) -> float:
    v = _real(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return v


def check_shape(shape: object, name: str) -> tuple[int, ...]:
    """A non-empty tuple of positive integers (floats, bools and strings are rejected, not truncated)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {shape!r}")
    dims = tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, Integral) or d <= 0 for d in dims):
        raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def check_choice(value: T, choices: Collection[object], name: str) -> T:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
