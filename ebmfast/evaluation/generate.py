"""Samples from a trained energy model: Langevin chains from U(-1, 1) noise (the seed's generation from scratch).

``noise_start`` is the one definition of a run's chain starts (drawn on the CPU from ``seed``, so they do not depend
on the device); ``generate_from_noise`` runs them through a given sampler with its noise stream set to ``seed`` for
the call and restored afterwards (a training run's stream is not disturbed); ``generate`` builds the sampler from a
checkpoint's settings (``ebmfast sample``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference import SEED_STEP
from ..sampler import LangevinSampler
from ..training.config import config_value
from ..validation import check_int

__all__ = ["noise_start", "generate_from_noise", "generate", "SAMPLER_DEFAULTS", "sampler_settings"]

SAMPLER_DEFAULTS = {k: getattr(SEED_STEP, k) for k in ("step_size", "noise_std", "grad_clip")}  # the seed's


def sampler_settings(config) -> dict[str, float]:
    """Step size, noise and gradient clip of a training config (``sampler_step_size``, ...), else the seed's."""
    return {
        k: float(config_value(config, f"sampler_{k}", config_value(config, k, v))) for k, v in SAMPLER_DEFAULTS.items()
    }


def noise_start(n: int, shape, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n`` chain starts of ``shape``, U(-1, 1), drawn on the CPU from ``seed``, then moved to ``device``."""
    x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)).mul_(2).sub_(1)
    return x.to(device=device, dtype=dtype)


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    return tuple(getattr(model, "input_shape", (1, 28, 28)))


def generate_from_noise(
    sampler, model: nn.Module, n: int, steps: int, seed: int, device=None, return_trajectory: bool = False
):
    """``n`` chains of ``steps`` steps from ``noise_start(n, ..., seed)``, the sampler's noise stream set to ``seed``
    for the call and restored afterwards. ``return_trajectory``: ``(final, states after each step)``."""
    params = list(model.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    x0 = noise_start(n, _input_shape(model), seed, device=device, dtype=dtype)
    saved = sampler.state_dict()
    try:
        sampler.manual_seed(seed)
        out = sampler.sample(x0, steps=steps, return_trajectory=return_trajectory)
    finally:
        sampler.load_state_dict(saved)
    return out


def generate(
    model: nn.Module,
    n: int = 64,
    steps: int = 256,
    seed: int = 0,
    backend: str = "auto",
    config: dict | None = None,
    device=None,
) -> torch.Tensor:
    """``n`` samples (n, 1, 28, 28) in [-1, 1]: ``steps`` Langevin steps from U(-1, 1), reproducible from ``seed``,
    with the sampler settings of ``config`` (a checkpoint's training config; the seed's when absent)."""
    n, steps, seed = check_int(n, "n"), check_int(steps, "steps"), check_int(seed, "seed", minimum=0)
    params = list(model.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=seed, **sampler_settings(config))
    return generate_from_noise(sampler, model, n, steps, seed, device=device)
