"""Torch custom ops of the layer kernels: ``ebmfast::layers_step_`` / ``ebmfast::layers_energy_grad``
(``kernels/layers.py``, called by ``ebmfast.layers.LayerProgram``) and ``ebmfast::persistent_chain_``
(``kernels/persistent.py``, called by ``ebmfast.persistent.PersistentProgram``).

The fused Langevin update ops live in ``ebmfast.langevin``, the replay-buffer ops in ``ebmfast.buffer``, and how
every op is defined (``triton_op`` or ``custom_op``, Triton present or not) in ``ebmfast.opdef``. The names below
``# compatibility`` keep the benchmarks' current calls working (bench/bench_buffer.py); new code imports them from
their own modules.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import langevin
from .buffer import fused_replay_available
from .opdef import USES_TRITON_OP, define_op, load_kernels, triton_on_cpu, triton_unavailable_reason, wrap

__all__ = [
    "layers_step_",
    "layers_energy_grad",
    "persistent_chain_",
    "layer_kernels_unavailable_reason",
    "persistent_unavailable_reason",
    "check_step_args",
    "layer_kernels",
    "persistent_kernels",
]

check_step_args = langevin.check_step_args

# compatibility: names the benchmarks still reach through ``ops``
__all__ += ["fused_replay_available"]


# ================================================================================ layer program (kernels/layers.py)
# ``ebmfast::layers_step_(x, z, rng, weights, biases, scratch, geometry, precision, step_size, grad_clip, noise_std,
# lo, hi, noise_index, add_noise)``: one Langevin step tail of a chain model on x in place, the energy gradient formed
# by the layer kernels and the update fused into the last of them (= langevin.step_(x, grad(x), rng, ...)).
# ``ebmfast::layers_energy_grad(x, weights, biases, scratch, geometry, precision) -> g``: the gradient alone.
# ``weights``/``biases``: one per Conv2d/Linear, the final Linear(k, 1) last (a bias entry is read only where the
# geometry says the layer has one); ``scratch``: the plan's buffers (mutated); ``geometry``: kernels/geometry.py's
# int encoding; ``precision``: 0 fp32, 1 tf32, 2 bf16. Built and called by ``ebmfast.layers.LayerProgram``.
# CUDA with Triton, or CPU tensors under the interpreter with EBMFAST_TRITON_ON_CPU=1; elsewhere a clear error.
layer_kernels = load_kernels("layers")  # None without Triton


def layer_kernels_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the layer kernels run on ``device``, else why not."""
    device = torch.device(device)
    if layer_kernels is None:
        return f"the layer kernels need Triton: {triton_unavailable_reason() or 'kernels/layers.py failed to import'}"
    if device.type == "cuda" or (device.type == "cpu" and triton_on_cpu()):
        return None
    return (
        f"the layer kernels run on CUDA devices (or on CPU only under the Triton interpreter, TRITON_INTERPRET=1 with "
        f"EBMFAST_TRITON_ON_CPU=1), got tensors on {device}"
    )


def _require_layers(device: torch.device | str) -> None:
    reason = layer_kernels_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


@define_op("ebmfast::layers_step_", mutates_args={"x", "scratch"})
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
    layer_kernels.launch_step(
        x, z, rng, weights, biases, scratch, geometry, precision, step_size, grad_clip, noise_std, lo, hi,
        noise_index, add_noise, wrap=wrap,
    )  # fmt: skip


@define_op("ebmfast::layers_energy_grad", mutates_args={"scratch"})
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
    layer_kernels.launch_energy_grad(x, g, weights, biases, scratch, geometry, precision, wrap=wrap)
    return g


if not USES_TRITON_OP:

    @layers_step_.register_fake
    def _(x: torch.Tensor, *rest: object) -> None:
        return None

    @layers_energy_grad.register_fake
    def _(x: torch.Tensor, *rest: object) -> torch.Tensor:
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
persistent_kernels = load_kernels("persistent")  # None without Triton


def persistent_unavailable_reason(device: torch.device | str) -> str | None:
    """None if the persistent chain kernel runs on ``device``, else why not."""
    if persistent_kernels is None and layer_kernels is not None:
        return "the persistent chain kernel needs kernels/persistent.py, which failed to import"
    return layer_kernels_unavailable_reason(device)


@define_op("ebmfast::persistent_chain_", mutates_args={"x", "trajectory", "scratch"})
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

    persistent_kernels.launch_chain(
        x, noise, trajectory, rng, weights, biases, scratch, decode_geometry(geometry), precision,
        persistent_kernels.ChainSettings.decode(settings), steps, step_size, grad_clip, noise_std, lo, hi, wrap=wrap,
    )  # fmt: skip


if not USES_TRITON_OP:

    @persistent_chain_.register_fake
    def _(x: torch.Tensor, *rest: object) -> None:
        return None
