"""Contrastive-divergence training throughput per backend (``ebmfast bench``'s second table).

One iteration is what ``ebmfast train`` runs: ``ebmfast.cd.CDStep`` (real-image noise, replay-buffer draw, K-step
chain, one forward on cat(real, fake), CD + alpha * L2 loss, backward, gradient-norm clip 0.1, Adam step, write-back),
through ``CDIteration`` on synthetic real images in [-1, 1] (throughput does not depend on the data). Per backend it
reports iterations/s, the projected wall time of the seed's 60-epoch MNIST run (468 iterations per epoch), and the
time of the chain alone with the same sampler (``sampler.sample(buffer.draw(B))``, timed in the same rounds), so that
iteration / chain says what the rest of the iteration costs. On CUDA a ``cdgraph`` row runs the whole iteration as one
CUDA graph (``ebmfast.cd_graph.CDGraph``, what the trainer does by default there) with the ``graph`` backend's chain.
The optimizer and the choice between the captured and the uncaptured iteration are the trainer's own
(``training.step.build_optimizer``, ``IterationRunner``), the buffer and loss settings ``TrainConfig``'s defaults; it
does not build a trainer, so it runs where the data set or optional packages are missing.
Iterations are interleaved across rows like the sampler measurement.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..buffer import ReplayBuffer
from ..cd import CDStep
from ..devices import resolve_device
from ..sampler import LangevinSampler
from ..training.config import TrainConfig
from ..training.step import IterationRunner, build_optimizer
from .timing import TimedRow, progress_bar, record_failure, rotations, telemetry_for, time_call, uniform, wall_call

__all__ = ["SEED_EPOCHS", "SEED_ITERS_PER_EPOCH", "ITERATION_GRAPH_ROW", "CDIteration", "TrainResult", "bench_train"]

SEED_EPOCHS = 60
SEED_ITERS_PER_EPOCH = 468  # 60,000 MNIST images / batch 128, drop_last
ITERATION_GRAPH_ROW = "cdgraph"  # the row whose whole iteration is one CUDA graph (sampler backend "graph")


class CDIteration:
    """One contrastive-divergence iteration of the seed's recipe, as the trainer runs it: ``CDStep`` on a sampler
    of ``backend`` with ``check_finite=False``, so no host synchronisation (the metrics tensor it returns, in
    ``CD_METRICS`` order, is not read back), through the trainer's ``IterationRunner``.

    ``iteration_graph=True`` (CUDA): the whole iteration replayed as one ``CDGraph`` (an error if it cannot be, and
    if the capture fails: that row is then not measured). ``optimizer``: the trainer's (``build_optimizer``: on CUDA
    ``Adam(capturable=True)`` with a device-tensor lr) unless given. ``alpha``, ``lr``, ``grad_norm_clip``: ``None``
    = ``TrainConfig``'s. ``chain()`` runs the chain alone (the sampler on a buffer draw), the reference the iteration
    time is compared with."""

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
        alpha: float | None = None,
        lr: float | None = None,
        sample_shape=None,
        compile_kwargs: dict | None = None,
        grad_norm_clip: float | None = None,
        iteration_graph: bool = False,
    ):
        self.device = resolve_device(device)
        self.model = model
        self.batch = int(batch)
        self.steps = int(steps)
        shape = tuple(sample_shape or model.input_shape)
        given = dict(alpha=alpha, lr=lr, grad_norm_clip=grad_norm_clip)
        config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
        self.sampler = LangevinSampler(
            model,
            steps=steps,
            backend=backend,
            precision=precision,
            seed=seed,
            compile_kwargs=compile_kwargs,
            check_finite=False,
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.buffer = ReplayBuffer(
            shape, capacity=config.buffer_size, fresh_prob=config.buffer_fresh_prob, device=self.device, generator=gen
        )
        if optimizer is None:
            optimizer = build_optimizer(model.parameters(), config, self.device)
        self.optimizer = optimizer
        self.step = CDStep(
            model,
            optimizer,
            self.sampler,
            self.buffer,
            alpha=config.alpha,
            grad_norm_clip=config.grad_norm_clip,
            generator=gen,
        )
        self.runner = IterationRunner(
            self.step, None if iteration_graph else "not asked for (a row without the iteration graph)", _no_fallback
        )
        if iteration_graph and not self.runner.captured:
            raise RuntimeError(f"the iteration graph was asked for: {self.runner.describe()}")

    @property
    def graph(self):
        """The ``CDGraph`` the iteration replays, or None (uncaptured)."""
        return self.runner.graph

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        return self.runner(real)

    def chain(self) -> torch.Tensor:
        """The same sampler's chain from a buffer draw, alone (nothing written back)."""
        return self.sampler.sample(self.buffer.draw(self.batch))


def _no_fallback(message: str) -> None:
    """A benchmark row measures what it names: a failed capture fails the row instead of timing the fall-back."""
    raise RuntimeError(message)


@dataclass
class TrainResult(TimedRow):
    first_iter_s: float | None = None
    iters_per_s: float | None = None
    projected_60_epochs_min: float | None = None  # SEED_EPOCHS x SEED_ITERS_PER_EPOCH iterations at median speed
    sampler_backend: str | None = None  # the chain's backend (= backend, except for the cdgraph row: "graph")
    iteration_graph: bool = False  # the whole iteration replayed as one CUDA graph (CDGraph)
    chain_times_s: list = field(default_factory=list)  # the chain alone, same sampler, same rounds
    chain_median_s: float | None = None
    iter_over_chain: float | None = None  # median iteration time / median chain time

    def finish(self) -> None:
        if not self.summarise():
            return
        self.iters_per_s = 1.0 / self.median_s
        self.projected_60_epochs_min = SEED_EPOCHS * SEED_ITERS_PER_EPOCH * self.median_s / 60.0
        if self.chain_times_s:
            self.chain_median_s = statistics.median(self.chain_times_s)
            self.iter_over_chain = self.median_s / self.chain_median_s


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
    iteration_graph: bool | None = None,
) -> list[TrainResult]:
    """CD iterations/s per backend, interleaved like ``bench_sampler``, each with its chain time.

    ``iteration_graph`` (default: on CUDA when ``graph`` is among ``backends``) adds the ``cdgraph`` row. All rows
    train the same model object (its weights keep changing, which does not change the work per iteration); the
    uncaptured rows share one Adam (the trainer's, ``build_optimizer``), the cdgraph row has its own. Sharing the
    model avoids a torch.compile re-compilation per model copy."""
    device = resolve_device(device)
    model = model.to(device)
    shape = tuple(model.input_shape)
    optimizer = build_optimizer(model.parameters(), TrainConfig(), device)
    real = uniform((batch, *shape), device, seed + 7)
    timer = "cuda-events" if device.type == "cuda" else "perf_counter"
    if iteration_graph is None:
        iteration_graph = device.type == "cuda" and "graph" in backends
    plan = [(b, b, False) for b in backends]  # (row, sampler backend, whole-iteration graph)
    if iteration_graph:
        plan.append((ITERATION_GRAPH_ROW, "graph", True))
    rows = {
        name: TrainResult(name, batch, steps, str(device), timer, sampler_backend=b, iteration_graph=g)
        for name, b, g in plan
    }
    fns = {}
    bar = progress_bar(len(plan) * (iters + 1), "train", progress)
    with telemetry_for(device, telemetry) as tel:
        for name, b, g in plan:
            try:
                fn = CDIteration(
                    model,
                    b,
                    batch,
                    steps,
                    device,
                    precision,
                    seed,
                    optimizer=None if g else optimizer,
                    compile_kwargs=compile_kwargs,
                    iteration_graph=g,
                )
                rows[name].first_iter_s = wall_call(partial(fn, real), device)
                fn.chain()  # the chain alone, once untimed (a graph backend captures it here)
            except Exception as exc:
                record_failure(rows[name], exc)
                bar.update(iters + 1)
                continue
            rows[name].last_backend = fn.sampler.last_backend
            fns[name] = fn
            bar.update(1)
        for order in rotations([name for name, _, _ in plan if name in fns], iters):
            for name in order:
                if name not in fns:
                    continue
                fn = fns[name]
                try:
                    rows[name].times_s.append(time_call(partial(fn, real), device))
                    rows[name].chain_times_s.append(time_call(fn.chain, device))
                except Exception as exc:
                    record_failure(rows[name], exc)
                    del fns[name]
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
