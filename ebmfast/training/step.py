"""One contrastive-divergence iteration of the seed's recipe (``DeepEnergyModel.training_step``): the one place where
the training step is written.

    real <- clamp(real + real_noise_std * N(0, 1), -1, 1)
    fake <- sampler(buffer.draw(B))                       Langevin chains from the replay buffer
    real_out, fake_out <- f(cat(real, fake))              one forward, model in training mode
    loss = alpha * mean(real_out^2 + fake_out^2) + mean(fake_out) - mean(real_out)
    Adam step after gradient-norm clipping; the chains go back into the buffer

A non-finite loss makes no update (and writes nothing back): the divergence monitor sees it in the returned metrics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..reference import energy_scores

__all__ = ["STEP_METRICS", "train_step"]

STEP_METRICS = ("loss", "loss_regularization", "loss_contrastive_divergence", "metrics_avg_real", "metrics_avg_fake")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler,
    buffer,
    real: torch.Tensor,
    *,
    generator: torch.Generator,
    alpha: float,
    real_noise_std: float,
    grad_norm_clip: float,
) -> dict[str, float]:
    """One iteration on ``real`` (a batch on the training device); returns ``STEP_METRICS`` (+ ``grad_norm``)."""
    noise = torch.randn(real.shape, generator=generator, device=real.device)
    real = (real + real_noise_std * noise).clamp_(-1.0, 1.0)
    fake = sampler.sample(buffer.draw(real.shape[0]))

    model.train()
    real_out, fake_out = energy_scores(model, torch.cat([real, fake], dim=0)).chunk(2, dim=0)
    reg = alpha * (real_out**2 + fake_out**2).mean()
    cdiv = fake_out.mean() - real_out.mean()
    loss = reg + cdiv
    values = torch.stack([loss, reg, cdiv, real_out.mean(), fake_out.mean()]).tolist()
    metrics = dict(zip(STEP_METRICS, values))
    if not math.isfinite(values[0]):
        return metrics  # no update from a non-finite loss; the divergence monitor handles it
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), grad_norm_clip))
    optimizer.step()
    buffer.push(fake)
    return metrics
