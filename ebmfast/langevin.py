"""The fused Langevin update as torch custom ops, so torch.compile, fake tensors and CUDA graphs see it, and ``step_``,
the checked call every chain makes (``ebmfast.chain``).

- ``torch.ops.ebmfast.langevin_step_(x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index,
  add_noise)``: in place on ``x``; ``x <- clamp(x - s*clamp(g)); x <- clamp(x + sigma*z)`` (either part optional:
  ``g=None`` skips the gradient step, ``add_noise=False`` the noise). ``z=None`` draws the noise from the stream
  ``rng = int64[2] (seed, counter)`` at position ``counter + noise_index``.
- ``torch.ops.ebmfast.langevin_normal(rng, numel, noise_index)``: that same stream, written out (parity mode).

Implementations: Triton (``kernels/langevin.py``) for CUDA tensors; plain torch for CPU tensors. The CPU stream is a
different, equally reproducible generator (CPU Generator seeded from (seed, counter), ``cpu_normal``); on CPU the
Triton kernels can still be exercised under ``TRITON_INTERPRET=1`` with ``EBMFAST_TRITON_ON_CPU=1`` (tests do).
Without Triton the CPU ops work and a CUDA call raises a clear error (``ebmfast.opdef``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .opdef import HAS_TRITON, USES_TRITON_OP, define_op, load_kernels, triton_on_cpu, triton_unavailable_reason, wrap
from .reference import StepSettings

__all__ = ["langevin_step_", "langevin_normal", "step_", "check_step_args", "cpu_normal", "mix", "kernels"]

kernels = load_kernels("langevin")  # None without Triton


def check_step_args(x: torch.Tensor, g: torch.Tensor | None, z: torch.Tensor | None, rng: torch.Tensor) -> None:
    """What every in-place step op needs: ``x`` contiguous, ``g``/``z`` shaped like it, ``rng`` int64[2] beside it."""
    if not x.is_contiguous():
        raise ValueError("langevin_step_: x must be contiguous (the kernel updates it in place)")
    for name, t in (("g", g), ("z", z)):
        if t is not None and (t.shape != x.shape or t.device != x.device or not t.is_contiguous()):
            raise ValueError(
                f"langevin_step_: {name} must be a contiguous tensor shaped like x {tuple(x.shape)} on {x.device}, "
                f"got {tuple(t.shape)} on {t.device}"
            )
    if rng.dtype != torch.int64 or rng.numel() != 2 or rng.device != x.device:
        raise ValueError(
            f"langevin_step_: rng must be an int64 tensor of 2 elements (seed, counter) on {x.device}, "
            f"got {rng.dtype} with {rng.numel()} elements on {rng.device}"
        )


def mix(seed: int, counter: int) -> int:
    """A 63-bit generator seed from (seed, counter): splitmix64 finaliser, so nearby counters decorrelate."""
    v = (seed * 0x9E3779B97F4A7C15 + counter + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    v ^= v >> 30
    v = (v * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    v ^= v >> 27
    v = (v * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    v ^= v >> 31
    return v & 0x7FFFFFFFFFFFFFFF


def cpu_normal(
    rng: torch.Tensor, shape: tuple[int, ...] | torch.Size, noise_index: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The CPU stream: N(0, 1) draws for position ``rng[1] + noise_index`` of the stream keyed by ``rng[0]``."""
    seed, counter = (int(v) for v in rng.tolist())
    gen = torch.Generator(device="cpu").manual_seed(mix(seed, counter + int(noise_index)))
    return torch.randn(shape, generator=gen, dtype=dtype)


def _require_triton(device: torch.device | str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"the fused Langevin kernel needs Triton for {device} tensors: {triton_unavailable_reason()}. "
            "Use backend='eager' or 'compiled', or run on CPU."
        )


def _torch_on_cpu(device: torch.device) -> bool:
    """Whether an op runs its plain torch code: CPU tensors, unless the Triton kernels run there (``triton_on_cpu``)."""
    return device.type == "cpu" and not triton_on_cpu()


def _langevin_step_(
    x: torch.Tensor,
    g: Optional[torch.Tensor],  # noqa: UP045 (torch.library parses the annotation; Optional works on every torch)
    z: Optional[torch.Tensor],  # noqa: UP045
    rng: torch.Tensor,
    step_size: float,
    grad_clip: float,
    noise_std: float,
    lo: float,
    hi: float,
    noise_index: int,
    add_noise: bool,
) -> None:
    if not _torch_on_cpu(x.device):
        _require_triton(x.device)
        kernels.launch_langevin_step(
            x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index, add_noise, wrap=wrap
        )
        return
    # Same arithmetic, in the same order, as the reference: x + (-s * g) then clamp; x + sigma * z then clamp.
    with torch.no_grad():
        if g is not None:
            x.add_(-step_size * g.clamp(-grad_clip, grad_clip)).clamp_(lo, hi)
        if add_noise:
            if z is None:
                z = cpu_normal(rng, x.shape, noise_index, dtype=x.dtype)
            x.add_(noise_std * z).clamp_(lo, hi)


def _langevin_normal(rng: torch.Tensor, numel: int, noise_index: int) -> torch.Tensor:
    if _torch_on_cpu(rng.device):
        return cpu_normal(rng, (numel,), noise_index)
    out = torch.empty(numel, dtype=torch.float32, device=rng.device)
    _require_triton(rng.device)
    kernels.launch_normal(out, rng, noise_index, wrap=wrap)
    return out


# One function per op, for every device: the op's body and, registered again, its CPU kernel (a ``triton_op`` body
# is what torch.compile traces; the CPU kernel keeps eager CPU calls on the same function either way).
langevin_step_ = define_op("ebmfast::langevin_step_", mutates_args={"x"})(_langevin_step_)
langevin_normal = define_op("ebmfast::langevin_normal", mutates_args={})(_langevin_normal)
langevin_step_.register_kernel("cpu")(_langevin_step_)
langevin_normal.register_kernel("cpu")(_langevin_normal)


if not USES_TRITON_OP:  # triton_op derives fake implementations itself; custom_op needs them spelled out

    @langevin_step_.register_fake
    def _(x: torch.Tensor, *rest: object) -> None:
        return None

    @langevin_normal.register_fake
    def _(rng: torch.Tensor, numel: int, noise_index: int) -> torch.Tensor:
        return rng.new_empty(numel, dtype=torch.float32)


def step_(
    x: torch.Tensor,
    g: torch.Tensor | None,
    rng: torch.Tensor,
    settings: StepSettings,
    *,
    noise_index: int,
    add_noise: bool,
    z: torch.Tensor | None = None,
) -> None:
    """Checked call of ``torch.ops.ebmfast.langevin_step_`` with the step's ``settings``."""
    check_step_args(x, g, z, rng)
    torch.ops.ebmfast.langevin_step_(
        x,
        g,
        z,
        rng,
        *settings.op_args(),
        int(noise_index),
        bool(add_noise),
    )
