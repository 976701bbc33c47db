"""The seed's Langevin sampler, eager and literal: the single reference every fast path is tested against.

Per step, in this order (seed tutorial, ``DeepEnergyModel.generate_samples``)::

    x <- clamp(x + noise_std * z_k, lo, hi)        z_k ~ N(0, 1)
    g <- grad_x sum(-f(x))                          (f = model output = -E)
    g <- clamp(g, -grad_clip, grad_clip)
    x <- clamp(x - step_size * g, lo, hi)

``noise`` lets a caller supply the standard-normal draws ``z`` (shape ``(steps, *x.shape)``), so that a fast
path that generates its noise differently can be compared with this one trajectory by trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .validation import check_clamp, check_nonneg_float, check_positive_float, check_positive_int, check_samples

__all__ = [
    "StepSettings",
    "SEED_STEP",
    "langevin_reference",
    "sampling_mode",
    "energy_grad_reference",
    "as_scores",
    "energy_scores",
]


@dataclass(frozen=True)
class StepSettings:
    """A Langevin step's hyper-parameters, as the chain and the kernels take them; the defaults are the seed's recipe
    (``SEED_STEP``: ``Sampler.sample_new_exmps(step_size=10)``, noise 0.005, gradient clip 0.03, clamp to [-1, 1])."""

    step_size: float = 10.0
    grad_clip: float = 0.03
    noise_std: float = 0.005
    lo: float = -1.0
    hi: float = 1.0

    @property
    def clamp(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def sampler_kwargs(self) -> dict[str, object]:
        """The same settings as ``LangevinSampler`` / ``langevin_reference`` take them (``clamp`` a pair)."""
        return dict(step_size=self.step_size, noise_std=self.noise_std, grad_clip=self.grad_clip, clamp=self.clamp)

    def op_args(self) -> tuple[float, float, float, float, float]:
        """``(step_size, grad_clip, noise_std, lo, hi)`` as plain floats, in the order every step op's schema takes
        them (``langevin_step_``, ``layers_step_``, ``persistent_chain_``): the one place they become floats."""
        return (float(self.step_size), float(self.grad_clip), float(self.noise_std), float(self.lo), float(self.hi))


SEED_STEP = StepSettings()  # the seed's recipe: every default step size, noise, clip and clamp is read from here


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while sampling; both restored afterwards (also on error).

    Unlike the seed, which sets ``requires_grad=True`` on every parameter afterwards, this restores each
    parameter's own flag, so frozen layers stay frozen.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def as_scores(out: object, batch: int) -> torch.Tensor:
    """A model's output as one score per sample, shape ``(batch,)``: ``(N,)`` and ``(N, 1)`` are accepted (the
    common ``nn.Linear(k, 1)`` head), anything else is refused with what was expected and given."""
    if isinstance(out, torch.Tensor) and (
        tuple(out.shape) == (batch,) or (out.dim() == 2 and tuple(out.shape) == (batch, 1))
    ):
        return out.reshape(batch)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(
        f"the energy model must map a batch (N, ...) to one score per sample, shape (N,) or (N, 1); for a batch "
        f"of {batch} it returned {shape}"
    )


def energy_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) = -E(x) for a batch, shape ``(N,)`` (see ``as_scores``)."""
    return as_scores(model(x), x.shape[0])


def energy_grad_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g = grad_x sum(-f(x)) (the gradient of the summed energy), eager."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = energy_scores(model, xg)
        (g,) = torch.autograd.grad(-out.sum(), xg)
    return g


@torch.no_grad()
def langevin_reference(
    model: nn.Module,
    x: torch.Tensor,
    steps: int = 60,
    step_size: float = SEED_STEP.step_size,
    noise_std: float = SEED_STEP.noise_std,
    grad_clip: float = SEED_STEP.grad_clip,
    clamp: tuple[float, float] = SEED_STEP.clamp,
    noise: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    energy_grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps`` Langevin steps from ``x`` (not modified) and return the detached samples.

    With ``return_trajectory=True`` returns ``(samples, trajectory)`` where ``trajectory`` has shape
    ``(steps, *x.shape)`` and holds the state after each step (the seed's ``imgs_per_step``).

    ``noise``: None (draw ``torch.randn`` with ``generator``), a tensor of shape ``(steps, *x.shape)`` of
    standard-normal draws, or a callable ``k -> z_k``. ``energy_grad``: a callable ``x -> g`` replacing the
    autograd gradient (used by the ``compiled`` backend; the step arithmetic stays this function's).
    """
    check_samples(x)
    steps = check_positive_int(steps, "steps")
    step_size = check_positive_float(step_size, "step_size")
    noise_std = check_nonneg_float(noise_std, "noise_std")
    grad_clip = check_positive_float(grad_clip, "grad_clip")
    lo, hi = check_clamp(clamp)
    if isinstance(noise, torch.Tensor):
        expected = (steps, *x.shape)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape (steps, *x.shape) = {expected}, got {tuple(noise.shape)}")

    x = x.detach().clone()
    traj = [] if return_trajectory else None
    with sampling_mode(model):
        for k in range(steps):
            if noise is None:
                z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            elif callable(noise):
                z = noise(k)
            else:
                z = noise[k]
            x.add_(noise_std * z.to(device=x.device, dtype=x.dtype)).clamp_(lo, hi)
            g = energy_grad_reference(model, x) if energy_grad is None else energy_grad(x)
            # out of place: g may be autograd's own (possibly expanded) tensor; clamp keeps NaN as NaN
            x.add_(-step_size * g.clamp(-grad_clip, grad_clip)).clamp_(lo, hi)
            if traj is not None:
                traj.append(x.clone())
    if traj is not None:
        return x, torch.stack(traj)
    return x
