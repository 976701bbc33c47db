"""Contrastive-divergence training throughput per backend (``ebmfast bench``'s second table).

One iteration of the seed's recipe (``CDIteration``: replay-buffer draw, K-step chain, write-back, loss
``alpha*(real^2 + fake^2).mean() + fake.mean() - real.mean()``, Adam step) per backend, on synthetic real images in
[-1, 1] (throughput does not depend on the data); iterations/s and the projected wall time of the seed's 60-epoch
MNIST run (468 iterations per epoch). Self-contained: it does not use the trainer, so it runs where the data set or
optional packages are missing. Iterations are interleaved across backends like the sampler measurement.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..devices import resolve_device
from ..reference import energy_scores
from ..sampler import LangevinSampler
from .timing import progress_bar, quantile, record_failure, rotations, telemetry_for, time_call, uniform, wall_call

__all__ = ["SEED_EPOCHS", "SEED_ITERS_PER_EPOCH", "CDIteration", "TrainResult", "bench_train"]

SEED_EPOCHS = 60
SEED_ITERS_PER_EPOCH = 468  # 60,000 MNIST images / batch 128, drop_last


class CDIteration:
    """One contrastive-divergence iteration of the seed's recipe, as a callable on a real batch.

    Real images get N(0, 0.005^2) noise and are clamped; chains start from the replay buffer (5 % fresh uniform
    noise), run ``steps`` Langevin steps, are written back; loss = alpha*(real_out^2 + fake_out^2).mean()
    + fake_out.mean() - real_out.mean(); Adam(lr, betas=(0.0, 0.999)) steps. The loss is returned as a device
    tensor (not read back), but the iteration is not free of host synchronisation: ``sampler.sample`` (with its
    default ``check_finite=True``) and ``buffer.push`` each check that their input is finite, which waits for the
    device once per call (checks are skipped only while a CUDA graph is being captured)."""

    def __init__(
        self,
        model: nn.Module,
        backend: str,
        batch: int = 128,
        steps: int = 60,
        device=None,
        precision: str = "fp32",
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        alpha: float = 0.1,
        lr: float = 1e-4,
        sample_shape=None,
        compile_kwargs: dict | None = None,
    ):
        self.device = resolve_device(device)
        self.model = model
        self.batch = int(batch)
        self.steps = int(steps)
        self.alpha = float(alpha)
        shape = tuple(sample_shape or model.input_shape)
        self.sampler = LangevinSampler(
            model, steps=steps, backend=backend, precision=precision, seed=seed, compile_kwargs=compile_kwargs
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.buffer = ReplayBuffer(shape, capacity=8192, fresh_prob=0.05, device=self.device, generator=gen)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999))
        self._gen = gen

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(real.shape, device=real.device, generator=self._gen)
        real = (real + 0.005 * noise).clamp_(-1.0, 1.0)
        start = self.buffer.draw(self.batch)
        fake = self.sampler.sample(start, self.steps)
        self.buffer.push(fake)
        self.model.train()
        real_out, fake_out = energy_scores(self.model, torch.cat([real, fake], dim=0)).chunk(2, dim=0)
        reg = self.alpha * (real_out**2 + fake_out**2).mean()
        loss = reg + fake_out.mean() - real_out.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


@dataclass
class TrainResult:
    backend: str
    batch: int
    steps: int
    device: str
    timer: str
    times_s: list = field(default_factory=list)
    first_iter_s: float | None = None
    median_s: float | None = None
    q20_s: float | None = None
    q80_s: float | None = None
    iters_per_s: float | None = None
    ratio_to_eager: float | None = None
    projected_60_epochs_min: float | None = None  # SEED_EPOCHS x SEED_ITERS_PER_EPOCH iterations at median speed
    last_backend: str | None = None
    skipped: str | None = None
    telemetry: dict | None = None

    def finish(self) -> None:
        if not self.times_s:
            return
        self.median_s = statistics.median(self.times_s)
        self.q20_s, self.q80_s = quantile(self.times_s, 0.2), quantile(self.times_s, 0.8)
        self.iters_per_s = 1.0 / self.median_s
        self.projected_60_epochs_min = SEED_EPOCHS * SEED_ITERS_PER_EPOCH * self.median_s / 60.0


def bench_train(
    model: nn.Module,
    device,
    backends,
    batch: int = 128,
    steps: int = 60,
    iters: int = 5,
    precision: str = "fp32",
    seed: int = 0,
    telemetry: bool = True,
    progress: bool = True,
    compile_kwargs: dict | None = None,
) -> list[TrainResult]:
    """CD iterations/s per backend, interleaved like ``bench_sampler``.

    All backends train the same model object with one shared Adam (its weights keep changing, which does not
    change the work per iteration); sharing avoids a torch.compile re-compilation per model copy."""
    device = resolve_device(device)
    model = model.to(device)
    shape = tuple(model.input_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.999))
    real = uniform((batch, *shape), device, seed + 7)
    timer = "cuda-events" if device.type == "cuda" else "perf_counter"
    rows = {b: TrainResult(b, batch, steps, str(device), timer) for b in backends}
    steps_fns = {}
    bar = progress_bar(len(backends) * (iters + 1), "train", progress)
    with telemetry_for(device, telemetry) as tel:
        for b in backends:
            try:
                fn = CDIteration(
                    model, b, batch, steps, device, precision, seed, optimizer=optimizer, compile_kwargs=compile_kwargs
                )
                rows[b].first_iter_s = wall_call(partial(fn, real), device)
            except Exception as exc:
                record_failure(rows[b], exc)
                bar.update(iters + 1)
                continue
            rows[b].last_backend = fn.sampler.last_backend
            steps_fns[b] = fn
            bar.update(1)
        for order in rotations([b for b in backends if b in steps_fns], iters):
            for b in order:
                if b not in steps_fns:
                    continue
                fn = steps_fns[b]
                try:
                    rows[b].times_s.append(time_call(partial(fn, real), device))
                except Exception as exc:
                    record_failure(rows[b], exc)
                    del steps_fns[b]
                bar.update(1)
    bar.close()
    summary = tel.summary() if device.type == "cuda" else None
    for row in rows.values():
        row.finish()
        row.telemetry = summary
    if "eager" in rows and rows["eager"].iters_per_s:
        for row in rows.values():
            if row.iters_per_s:
                row.ratio_to_eager = row.iters_per_s / rows["eager"].iters_per_s
    return list(rows.values())
