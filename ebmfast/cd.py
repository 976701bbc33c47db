"""One contrastive-divergence iteration of the seed's recipe, written once: the trainer, the training benchmark and
the README example all run ``CDStep`` (and ``ebmfast.cd_graph`` captures it whole in a CUDA graph).

The iteration (seed: ``DeepEnergyModel.training_step`` with Lightning's ``gradient_clip_val``)::

    real <- clamp(real + real_noise_std * N(0, 1), -1, 1)
    fake <- sampler.sample(buffer.draw(B))                       (detached, model restored to training mode)
    real_out, fake_out <- f(cat(real, fake))                     (one forward, training mode)
    reg = alpha * mean(real_out^2 + fake_out^2);  cdiv = mean(fake_out) - mean(real_out);  loss = reg + cdiv
    loss.backward();  grad_norm = clip_grad_norm_(params, grad_norm_clip);  optimizer.step();  buffer.push(fake)

No host synchronisation: the step returns its metrics as one device tensor (``CD_METRICS`` order), and an
iteration whose loss or gradient norm is not finite is skipped on the device: the parameters, the optimizer state and
the replay buffer are left exactly as they were (``update_skipped`` = 1 in the metrics). The caller copies the
metrics to the host when it chooses (the trainer: every N iterations).
"""

from __future__ import annotations

import torch
from torch import nn

from .buffer import ReplayBuffer
from .reference import as_scores
from .sampler import LangevinSampler

__all__ = ["CD_METRICS", "CDStep", "cd_loss"]

CD_METRICS = (
    "loss",
    "loss_regularization",
    "loss_contrastive_divergence",
    "metrics_avg_real",
    "metrics_avg_fake",
    "grad_norm",
    "update_skipped",
)


def cd_loss(model: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """(loss, reg, cdiv, real_out, fake_out) of one forward on ``cat(real, fake)``."""
    out = as_scores(model(torch.cat([real, fake], dim=0)), 2 * real.shape[0])
    real_out, fake_out = out.chunk(2, dim=0)
    reg = alpha * (real_out**2 + fake_out**2).mean()
    cdiv = fake_out.mean() - real_out.mean()
    return reg + cdiv, reg, cdiv, real_out, fake_out


class _Guard:
    """Undo an optimizer step on the device when a flag says so: copies of the parameters and of the optimizer
    state before the step, restored with ``torch.where`` after it (no host synchronisation). State tensors the step
    creates (first step) are restored to zeros, which is their initial value for Adam, AdamW and SGD momentum."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _tensors(self) -> list[torch.Tensor]:
        out = list(self.params)
        for p in self.params:
            out.extend(t for t in self.optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor))
        return out

    @torch.no_grad()
    def save(self) -> None:
        tensors = self._tensors()
        if len(self.saved) != len(tensors) or any(a is not t for (a, _), t in zip(self.saved, tensors)):
            self.saved = [(t, torch.empty_like(t)) for t in tensors]  # once, and again if the state is replaced
        for t, copy in self.saved:
            copy.copy_(t)

    @torch.no_grad()
    def restore_unless(self, ok: torch.Tensor) -> None:
        known = {id(t) for t, _ in self.saved}
        for t, copy in self.saved:
            t.copy_(torch.where(ok, t, copy))
        for t in self._tensors():
            if id(t) not in known:  # created by this step
                t.copy_(torch.where(ok, t, torch.zeros_like(t)))


class CDStep:
    """The seed's CD iteration as a callable: ``metrics = step(real)``, a device tensor in ``CD_METRICS`` order.

    Args:
        model: the energy model f(x) = -E(x) (one score per sample, (N,) or (N, 1)).
        optimizer: over ``model``'s parameters (the seed: Adam(lr, betas=(0.0, 0.999))).
        sampler: a ``LangevinSampler`` on ``model``; give it ``check_finite=False`` for no host synchronisation.
        buffer: the ``ReplayBuffer`` the chains start from and go back to.
        alpha, real_noise_std, grad_norm_clip: the seed's 0.1, 0.005, 0.1.
        generator: the generator of the real-image noise (the buffer has its own).
        forward: the module the training forward runs through, when it is not ``model`` itself (e.g.
            ``DistributedDataParallel(model)``, whose backward all-reduces the gradients); the sampler always
            samples from ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: LangevinSampler,
        buffer: ReplayBuffer,
        *,
        alpha: float = 0.1,
        real_noise_std: float = 0.005,
        grad_norm_clip: float = 0.1,
        generator: torch.Generator | None = None,
        forward: nn.Module | None = None,
    ) -> None:
        if sampler.model is not model:
            raise ValueError("the sampler must sample from the model being trained (sampler.model is not model)")
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.buffer = buffer
        self.alpha = float(alpha)
        self.real_noise_std = float(real_noise_std)
        self.grad_norm_clip = float(grad_norm_clip)  # math.inf: no clipping (the norm is still reported)
        self.generator = generator
        self.forward = model if forward is None else forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._guard = _Guard(self.params, optimizer)

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(real.shape, generator=self.generator, device=real.device, dtype=real.dtype)
        real = (real + self.real_noise_std * noise).clamp_(-1.0, 1.0)
        fake = self.sampler.sample(self.buffer.draw(real.shape[0]))

        self.forward.train()
        loss, reg, cdiv, real_out, fake_out = cd_loss(self.forward, real, fake, self.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_norm_clip)
        ok = torch.isfinite(grad_norm)
        if self.forward is self.model:
            ok = ok & torch.isfinite(loss.detach())
        # Under a data-parallel wrapper the gradients (and so their norm) are the all-reduced ones, identical on every
        # rank, while the loss is this rank's own: deciding on the norm alone keeps all ranks' decisions the same (a
        # non-finite loss anywhere makes the reduced gradients non-finite everywhere).
        self._guard.save()
        self.optimizer.step()
        self._guard.restore_unless(ok)
        self.buffer.push(fake, keep=ok, check_finite=False)
        values = [loss, reg, cdiv, real_out.mean(), fake_out.mean(), grad_norm, (~ok).to(loss.dtype)]
        return torch.stack([v.detach().to(torch.float32).reshape(()) for v in values])
