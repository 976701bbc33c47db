"""The K-step fused Langevin chain, written once: every fast backend (``fused``, ``triton``, and their CUDA-graph
captures) runs this loop; only the step differs.

The seed's step k is noise -> clamp -> gradient -> clip -> step -> clamp. The fused chain shifts the cut so that
each launch does the tail of step k together with the head of step k+1::

    head(0)                       x <- clamp(x + sigma z_0)
    for k in 0..K-1:  tail(k)     x <- clamp(x - s clamp(g(x))); then, unless k is the last step,
                                  x <- clamp(x + sigma z_{k+1})

A ``Stepper`` supplies ``head_`` (noise only) and ``tail_`` (gradient step, optionally followed by the next noise),
both in place on ``x`` and reading the noise either from the stream ``rng = int64[2] (seed, counter)`` at position
``counter + noise_index`` or from a supplied tensor ``z``. The loop never reads anything back to the host, so it can
be captured in a CUDA graph as it is (``ebmfast.graph``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from . import langevin
from .reference import StepSettings

if TYPE_CHECKING:  # the programs import this module (for the loop), so their types are named for the checker only
    from .layers import LayerProgram
    from .persistent import PersistentProgram

__all__ = [
    "StepSettings",
    "Stepper",
    "FusedStepper",
    "LayerStepper",
    "run_chain_",
    "Chain",
    "StepChain",
    "PersistentChain",
]


class Stepper(Protocol):
    settings: StepSettings

    def head_(self, x: torch.Tensor, rng: torch.Tensor, noise_index: int, z: torch.Tensor | None) -> None:
        """x <- clamp(x + sigma z) with z = stream draw ``noise_index`` (or the supplied ``z``)."""

    def tail_(
        self, x: torch.Tensor, rng: torch.Tensor, noise_index: int, add_noise: bool, z: torch.Tensor | None
    ) -> None:
        """x <- clamp(x - s clamp(g(x))), then with ``add_noise`` the head of the next step (draw ``noise_index``)."""


class _NoiseHead:
    """The head shared by every stepper: noise only, through the fused update op (no gradient)."""

    settings: StepSettings

    def head_(self, x: torch.Tensor, rng: torch.Tensor, noise_index: int, z: torch.Tensor | None) -> None:
        langevin.step_(x, None, rng, self.settings, noise_index=noise_index, add_noise=True, z=z)


class FusedStepper(_NoiseHead):
    """Gradient from a function (compiled or eager), then one fused update op (``langevin.step_``)."""

    def __init__(self, grad: Callable[[torch.Tensor], torch.Tensor], settings: StepSettings) -> None:
        self.grad = grad
        self.settings = settings

    def tail_(
        self, x: torch.Tensor, rng: torch.Tensor, noise_index: int, add_noise: bool, z: torch.Tensor | None
    ) -> None:
        g = self.grad(x).contiguous()
        langevin.step_(x, g, rng, self.settings, noise_index=noise_index, add_noise=add_noise, z=z)


class LayerStepper(_NoiseHead):
    """The tail on our layer kernels (``ebmfast.layers``): forward, input gradient and update, the update being the
    epilogue of the last launch. ``keep``: buffers a captured graph reads (the program's scratch for this shape)."""

    def __init__(self, program: LayerProgram, settings: StepSettings, keep: list[torch.Tensor] | None = None) -> None:
        self.program = program
        self.settings = settings
        self.keep = keep

    def tail_(
        self, x: torch.Tensor, rng: torch.Tensor, noise_index: int, add_noise: bool, z: torch.Tensor | None
    ) -> None:
        self.program.step_(x, None, rng, self.settings, noise_index=noise_index, add_noise=add_noise, z=z)


@torch.no_grad()
def run_chain_(
    x: torch.Tensor,
    steps: int,
    rng: torch.Tensor,
    stepper: Stepper,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``steps`` Langevin steps on ``x`` in place (contiguous); returns ``(x, trajectory or None)``.

    ``noise``: explicit draws ``(steps, *x.shape)`` instead of the stream (the stream is not read). With
    ``return_trajectory`` the state after each full step is kept, so the tail and the next head run apart.
    The caller advances ``rng[1]`` by ``steps`` afterwards (the graph backend captures that too)."""
    traj: list[torch.Tensor] | None = [] if return_trajectory else None
    stepper.head_(x, rng, 0, None if noise is None else noise[0])
    for k in range(steps):
        last = k == steps - 1
        z = None if (noise is None or last) else noise[k + 1]
        if traj is None:  # this step's update + the next step's noise in one go
            stepper.tail_(x, rng, k + 1, not last, z)
        else:  # the trajectory needs the state between the two halves
            stepper.tail_(x, rng, k + 1, False, None)
            traj.append(x.clone())
            if not last:
                stepper.head_(x, rng, k + 1, z)
    return x, (torch.stack(traj) if traj is not None else None)


class StepChain:
    """The one loop (``run_chain_``) over a ``Stepper``'s steps."""

    def __init__(self, stepper: Stepper) -> None:
        self.stepper = stepper

    def run_(
        self,
        x: torch.Tensor,
        steps: int,
        rng: torch.Tensor,
        noise: torch.Tensor | None = None,
        return_trajectory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return run_chain_(x, steps, rng, self.stepper, noise, return_trajectory)


class PersistentChain:
    """The whole chain as one persistent kernel launch (``ebmfast.persistent``): the same head, steps and noise
    stream as ``run_chain_``, inside one kernel. ``keep``: buffers a captured graph reads (the scratch)."""

    def __init__(
        self, program: PersistentProgram, settings: StepSettings, keep: list[torch.Tensor] | None = None
    ) -> None:
        self.program = program
        self.settings = settings
        self.keep = keep

    @torch.no_grad()
    def run_(
        self,
        x: torch.Tensor,
        steps: int,
        rng: torch.Tensor,
        noise: torch.Tensor | None = None,
        return_trajectory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        traj = torch.empty((steps, *x.shape), dtype=x.dtype, device=x.device) if return_trajectory else None
        noise = None if noise is None else noise.contiguous()
        self.program.chain_(x, rng, steps, self.settings, noise=noise, trajectory=traj)
        return x, traj


Chain = StepChain | PersistentChain  # a whole K-step chain on ``x`` in place: what the sampler and graph cache run
