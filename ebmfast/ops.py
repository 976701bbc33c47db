"""Torch custom ops for the fused Langevin update, so torch.compile, fake tensors and CUDA graphs see them.

- ``torch.ops.ebmfast.langevin_step_(x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index,
  add_noise)``: in place on ``x``; ``x <- clamp(x - s*clamp(g)); x <- clamp(x + sigma*z)`` (either part optional:
  ``g=None`` skips the gradient step, ``add_noise=False`` the noise). ``z=None`` draws the noise from the stream
  ``rng = int64[2] (seed, counter)`` at position ``counter + noise_index``.
- ``torch.ops.ebmfast.langevin_normal(rng, numel, noise_index)``: that same stream, written out (parity mode).

Implementations: Triton (``ebmfast.kernels.langevin``) for CUDA tensors; plain torch for CPU tensors. The CPU
stream is a different, equally reproducible generator (CPU Generator seeded from (seed, counter)); on CPU the
Triton kernels can still be exercised under ``TRITON_INTERPRET=1`` with ``EBMFAST_TRITON_ON_CPU=1`` (tests do).
Without Triton the package still imports and the CPU ops work; a CUDA call raises a clear error.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = [
    "HAS_TRITON",
    "USES_TRITON_OP",
    "triton_unavailable_reason",
    "langevin_step_",
    "langevin_normal",
    "cpu_normal",
]

try:  # Triton is optional: the package must import (and run on CPU) without it.
    from ebmfast.kernels import langevin as _kernels

    HAS_TRITON = True
    _TRITON_ERROR = None
except Exception as exc:  # ImportError, or a broken Triton install
    _kernels = None
    HAS_TRITON = False
    _TRITON_ERROR = exc


def triton_unavailable_reason() -> str | None:
    if HAS_TRITON:
        return None
    return f"Triton could not be imported ({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR}); pip install triton"


def _triton_on_cpu() -> bool:
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("EBMFAST_TRITON_ON_CPU") == "1"


def _check_step_args(x: torch.Tensor, g: torch.Tensor | None, z: torch.Tensor | None, rng: torch.Tensor) -> None:
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


def _mix(seed: int, counter: int) -> int:
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
    gen = torch.Generator(device="cpu").manual_seed(_mix(seed, counter + int(noise_index)))
    return torch.randn(shape, generator=gen, dtype=dtype)


def _step_cpu(
    x: torch.Tensor,
    g: torch.Tensor | None,
    z: torch.Tensor | None,
    rng: torch.Tensor,
    step_size: float,
    grad_clip: float,
    noise_std: float,
    lo: float,
    hi: float,
    noise_index: int,
    add_noise: bool,
) -> None:
    if _triton_on_cpu():
        _kernels.launch_langevin_step(x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index, add_noise)
        return
    # Same arithmetic, in the same order, as the reference: x + (-s * g) then clamp; x + sigma * z then clamp.
    with torch.no_grad():
        if g is not None:
            x.add_(-step_size * g.clamp(-grad_clip, grad_clip)).clamp_(lo, hi)
        if add_noise:
            if z is None:
                z = cpu_normal(rng, x.shape, noise_index, dtype=x.dtype)
            x.add_(noise_std * z).clamp_(lo, hi)


def _normal_cpu(rng: torch.Tensor, numel: int, noise_index: int) -> torch.Tensor:
    if _triton_on_cpu():
        out = torch.empty(numel, dtype=torch.float32)
        _kernels.launch_normal(out, rng, noise_index)
        return out
    return cpu_normal(rng, (numel,), noise_index)


# triton_op lets torch.compile see (and inline) the Triton kernels. Under TRITON_INTERPRET=1 the kernels are numpy
# interpreters that fake tensors cannot trace, so there the ops are plain custom ops (opaque to torch.compile) with
# explicit fake implementations.
USES_TRITON_OP = HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1"
if USES_TRITON_OP:
    from torch.library import triton_op as _define_op
    from torch.library import wrap_triton as _wrap
else:
    from torch.library import custom_op as _define_op

    _wrap = None


def _require_triton(device: torch.device | str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"the fused Langevin kernel needs Triton for {device} tensors: {triton_unavailable_reason()}. "
            "Use backend='eager' or 'compiled', or run on CPU."
        )


@_define_op("ebmfast::langevin_step_", mutates_args={"x"})
def langevin_step_(
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
    _require_triton(x.device)
    _kernels.launch_langevin_step(
        x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index, add_noise, wrap=_wrap
    )


@_define_op("ebmfast::langevin_normal", mutates_args={})
def langevin_normal(rng: torch.Tensor, numel: int, noise_index: int) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=rng.device)
    _require_triton(rng.device)
    _kernels.launch_normal(out, rng, noise_index, wrap=_wrap)
    return out


if not USES_TRITON_OP:  # triton_op derives fake implementations itself; custom_op needs them spelled out

    @langevin_step_.register_fake
    def _(
        x: torch.Tensor,
        g: torch.Tensor | None,
        z: torch.Tensor | None,
        rng: torch.Tensor,
        step_size: float,
        grad_clip: float,
        noise_std: float,
        lo: float,
        hi: float,
        noise_index: int,
        add_noise: bool,
    ) -> None:
        return None

    @langevin_normal.register_fake
    def _(rng: torch.Tensor, numel: int, noise_index: int) -> torch.Tensor:
        return rng.new_empty(numel, dtype=torch.float32)


langevin_step_.register_kernel("cpu")(_step_cpu)
langevin_normal.register_kernel("cpu")(_normal_cpu)


def fused_step_(
    x: torch.Tensor,
    g: torch.Tensor | None,
    rng: torch.Tensor,
    *,
    step_size: float,
    grad_clip: float,
    noise_std: float,
    lo: float,
    hi: float,
    noise_index: int,
    add_noise: bool,
    z: torch.Tensor | None = None,
) -> None:
    """Checked entry point to ``torch.ops.ebmfast.langevin_step_``."""
    _check_step_args(x, g, z, rng)
    torch.ops.ebmfast.langevin_step_(
        x,
        g,
        z,
        rng,
        float(step_size),
        float(grad_clip),
        float(noise_std),
        float(lo),
        float(hi),
        int(noise_index),
        bool(add_noise),
    )


# ------------------------------------------------------------------------------------------------ replay buffer
# ``ebmfast::replay_draw(storage, rng, batch, fresh_prob, lo, hi) -> (out, slots)`` and
# ``ebmfast::replay_push_(storage, samples, ptr)``: the fused replay-buffer kernels (kernels/replay.py). They exist
# for CUDA (and for CPU tensors under the Triton interpreter with EBMFAST_TRITON_ON_CPU=1, for tests); the
# ReplayBuffer's default torch path covers every device.
try:
    from ebmfast.kernels import replay as _replay_kernels
except Exception:  # same cause as above: no usable Triton
    _replay_kernels = None


def fused_replay_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    if _replay_kernels is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _triton_on_cpu())


def _require_replay(device: torch.device | str) -> None:
    if not fused_replay_available(device):
        raise RuntimeError(
            f"the fused replay-buffer kernels run on CUDA with Triton (or on CPU under TRITON_INTERPRET=1 with "
            f"EBMFAST_TRITON_ON_CPU=1); got tensors on {device}"
            + (f" and {triton_unavailable_reason()}" if not HAS_TRITON else "")
        )


@_define_op("ebmfast::replay_draw", mutates_args={})
def replay_draw(
    storage: torch.Tensor, rng: torch.Tensor, batch: int, fresh_prob: float, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty((batch, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)
    slots = torch.empty(batch, dtype=torch.int64, device=storage.device)
    _require_replay(storage.device)
    _replay_kernels.launch_replay_draw(out, slots, storage, rng, fresh_prob, lo, hi, wrap=_wrap)
    return out, slots


@_define_op("ebmfast::replay_push_", mutates_args={"storage"})
def replay_push_(storage: torch.Tensor, samples: torch.Tensor, ptr: torch.Tensor) -> None:
    _require_replay(storage.device)
    _replay_kernels.launch_replay_push(storage, samples, ptr, wrap=_wrap)


def _replay_draw_cpu(
    storage: torch.Tensor, rng: torch.Tensor, batch: int, fresh_prob: float, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_replay(storage.device)
    out = torch.empty((batch, *storage.shape[1:]), dtype=storage.dtype)
    slots = torch.empty(batch, dtype=torch.int64)
    _replay_kernels.launch_replay_draw(out, slots, storage, rng, fresh_prob, lo, hi)
    return out, slots


def _replay_push_cpu(storage: torch.Tensor, samples: torch.Tensor, ptr: torch.Tensor) -> None:
    _require_replay(storage.device)
    _replay_kernels.launch_replay_push(storage, samples, ptr)


replay_draw.register_kernel("cpu")(_replay_draw_cpu)
replay_push_.register_kernel("cpu")(_replay_push_cpu)

if not USES_TRITON_OP:

    @replay_draw.register_fake
    def _(
        storage: torch.Tensor, rng: torch.Tensor, batch: int, fresh_prob: float, lo: float, hi: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return storage.new_empty((batch, *storage.shape[1:])), storage.new_empty(batch, dtype=torch.int64)

    @replay_push_.register_fake
    def _(storage: torch.Tensor, samples: torch.Tensor, ptr: torch.Tensor) -> None:
        return None


# ================================================================================ layer program (kernels/layers.py)
# ``ebmfast::layers_step_(x, z, rng, weights, biases, scratch, geometry, precision, step_size, grad_clip, noise_std,
# lo, hi, noise_index, add_noise)``: one Langevin step tail of a chain model on x in place, the energy gradient formed
# by the layer kernels and the update fused into the last of them (= fused_step_(x, grad(x), rng, ...)).
# ``ebmfast::layers_energy_grad(x, weights, biases, scratch, geometry, precision) -> g``: the gradient alone.
# ``weights``/``biases``: one per Conv2d/Linear, the final Linear(k, 1) last (a bias entry is read only where the
# geometry says the layer has one); ``scratch``: the plan's buffers (mutated); ``geometry``: kernels/geometry.py's
# int encoding; ``precision``: 0 fp32, 1 tf32, 2 bf16. Built and called by ``ebmfast.layers.LayerProgram``.
# CUDA with Triton, or CPU tensors under the interpreter with EBMFAST_TRITON_ON_CPU=1; elsewhere a clear error.
try:
    from ebmfast.kernels import layers as _layer_kernels
except Exception:  # same cause as above: no usable Triton
    _layer_kernels = None


def layer_kernels_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the layer kernels run on ``device``, else why not."""
    device = torch.device(device)
    if _layer_kernels is None:
        return f"the layer kernels need Triton: {triton_unavailable_reason() or 'kernels/layers.py failed to import'}"
    if device.type == "cuda" or (device.type == "cpu" and _triton_on_cpu()):
        return None
    return (
        f"the layer kernels run on CUDA devices (or on CPU only under the Triton interpreter, TRITON_INTERPRET=1 with "
        f"EBMFAST_TRITON_ON_CPU=1), got tensors on {device}"
    )


def _require_layers(device: torch.device | str) -> None:
    reason = layer_kernels_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


@_define_op("ebmfast::layers_step_", mutates_args={"x", "scratch"})
def layers_step_(
    x: torch.Tensor,
    z: Optional[torch.Tensor],  # noqa: UP045 (torch.library parses the annotation)
    rng: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    scratch: list[torch.Tensor],
    geometry: list[int],
    precision: int,
    step_size: float,
    grad_clip: float,
    noise_std: float,
    lo: float,
    hi: float,
    noise_index: int,
    add_noise: bool,
) -> None:
    _require_layers(x.device)
    _layer_kernels.launch_step(
        x, z, rng, weights, biases, scratch, geometry, precision, step_size, grad_clip, noise_std, lo, hi,
        noise_index, add_noise, wrap=_wrap,
    )  # fmt: skip


@_define_op("ebmfast::layers_energy_grad", mutates_args={"scratch"})
def layers_energy_grad(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    scratch: list[torch.Tensor],
    geometry: list[int],
    precision: int,
) -> torch.Tensor:
    g = torch.empty_like(x, memory_format=torch.contiguous_format)
    _require_layers(x.device)
    _layer_kernels.launch_energy_grad(x, g, weights, biases, scratch, geometry, precision, wrap=_wrap)
    return g


if not USES_TRITON_OP:

    @layers_step_.register_fake
    def _(
        x: torch.Tensor,
        z: torch.Tensor | None,
        rng: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        scratch: list[torch.Tensor],
        geometry: list[int],
        precision: int,
        *rest: object,
    ) -> None:
        return None

    @layers_energy_grad.register_fake
    def _(
        x: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        scratch: list[torch.Tensor],
        geometry: list[int],
        precision: int,
    ) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)


# ============================================================================= persistent chain (kernels/persistent.py)
# ``ebmfast::persistent_chain_(x, noise, trajectory, rng, weights, biases, scratch, geometry, precision, settings,
# steps, step_size, grad_clip, noise_std, lo, hi)``: a whole K-step Langevin chain of a layer-chain model on x in place,
# in one launch (head noise, then K fused steps; draws j = 0 .. K-1 at ``rng[1] + j``, or ``noise[j]`` when given).
# Does not advance ``rng``. ``trajectory`` (K, *x.shape), if given, receives the state after each step. ``weights`` /
# ``biases`` / ``geometry`` / ``precision`` as for ``layers_step_``; ``scratch``: one fp32 buffer of
# ``settings.programs * scratch_layout(...)[1]`` values (mutated); ``settings``: ``ChainSettings.encode()``.
# Built and called by ``ebmfast.persistent.PersistentProgram``. CUDA with Triton, or CPU tensors under the interpreter
# with EBMFAST_TRITON_ON_CPU=1; elsewhere a clear error (the same conditions as the layer kernels).
try:
    from ebmfast.kernels import persistent as _persistent_kernels
except Exception:  # same cause as above: no usable Triton
    _persistent_kernels = None


def persistent_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the persistent chain kernel runs on ``device``, else why not."""
    if _persistent_kernels is None and _layer_kernels is not None:
        return "the persistent chain kernel needs kernels/persistent.py, which failed to import"
    return layer_kernels_unavailable_reason(device)


@_define_op("ebmfast::persistent_chain_", mutates_args={"x", "trajectory", "scratch"})
def persistent_chain_(
    x: torch.Tensor,
    noise: Optional[torch.Tensor],  # noqa: UP045 (torch.library parses the annotation)
    trajectory: Optional[torch.Tensor],  # noqa: UP045
    rng: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    scratch: torch.Tensor,
    geometry: list[int],
    precision: int,
    settings: list[int],
    steps: int,
    step_size: float,
    grad_clip: float,
    noise_std: float,
    lo: float,
    hi: float,
) -> None:
    reason = persistent_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    from ebmfast.kernels.geometry import decode_geometry

    _persistent_kernels.launch_chain(
        x, noise, trajectory, rng, weights, biases, scratch, decode_geometry(geometry), precision,
        _persistent_kernels.ChainSettings.decode(settings), steps, step_size, grad_clip, noise_std, lo, hi, wrap=_wrap,
    )  # fmt: skip


if not USES_TRITON_OP:

    @persistent_chain_.register_fake
    def _(
        x: torch.Tensor,
        noise: torch.Tensor | None,
        trajectory: torch.Tensor | None,
        rng: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        scratch: torch.Tensor,
        geometry: list[int],
        precision: int,
        settings: list[int],
        *rest: object,
    ) -> None:
        return None
