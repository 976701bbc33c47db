"""Contrastive-divergence training throughput per backend (pytest-benchmark): the seed's recipe at batch 128,
60 Langevin steps per iteration (``--bench-train-batch`` / ``--bench-train-steps`` change them), and the projected
wall time of its 60-epoch MNIST run (468 iterations/epoch).

    pytest bench/bench_train.py --benchmark-only [--bench-device cuda] [--bench-train-iters N]

One iteration = what ``ebmfast train`` runs, ``ebmfast.cd.CDStep`` (replay-buffer draw + K-step chain + loss +
backward + gradient-norm clip + Adam step + write-back), through ``ebmfast.benchmark.training.CDIteration``, on
synthetic real images in [-1, 1]; each timed iteration is followed by a timed chain alone with the same sampler, so the
iteration / chain ratio comes from the same rounds. On CUDA ``test_cd_iteration_graph`` runs the whole iteration as one
CUDA graph (``CDGraph``), as the trainer does there. All backends train the same model object, so torch.compile does
not re-compile per model copy. Measurements only: nothing is asserted about speed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ebmfast.benchmark.timing import telemetry_for, time_call, uniform, wall_call
from ebmfast.benchmark.training import ITERATION_GRAPH_ROW, CDIteration, TrainResult


def _measure(benchmark, ctx, row: TrainResult, step: CDIteration, real: torch.Tensor) -> None:
    device = ctx.device
    with telemetry_for(device, True) as tel:
        row.first_iter_s = wall_call(lambda: step(real), device)
        row.last_backend = step.sampler.last_backend
        step.chain()  # untimed: a graph backend captures the chain alone here

        def one_iteration():
            row.times_s.append(time_call(lambda: step(real), device))
            row.chain_times_s.append(time_call(step.chain, device))

        benchmark.pedantic(one_iteration, rounds=ctx.train_iters, iterations=1, warmup_rounds=0)
    row.telemetry = tel.summary() if ctx.cuda else None
    row.finish()
    eager = ctx.eager("train", row.batch, row.steps)
    row.ratio_to_eager = (
        row.iters_per_s / eager.iters_per_s if eager is not None else (1.0 if row.backend == "eager" else None)
    )
    ctx.train_results.append(row)

    info = dataclasses.asdict(row)
    info["times_ms"] = [t * 1e3 for t in info.pop("times_s")]
    info["chain_times_ms"] = [t * 1e3 for t in info.pop("chain_times_s")]
    info["device_name"] = torch.cuda.get_device_name(device) if ctx.cuda else "cpu"
    benchmark.extra_info.update(info)
    benchmark.group = f"cd_iteration b{row.batch} k{row.steps}"


def test_cd_iteration(benchmark, bench_ctx, backend):
    ctx = bench_ctx
    device, model = ctx.device, ctx.model
    if ctx.optimizer is None:
        ctx.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.999))
    batch, steps = ctx.train_batch, ctx.train_steps  # default: the seed's 128 and 60
    row = TrainResult(
        backend, batch, steps, str(device), "cuda-events" if ctx.cuda else "perf_counter", sampler_backend=backend
    )
    real = uniform((batch, *model.input_shape), device, 7)
    step = CDIteration(model, backend, batch, steps, device, seed=0, optimizer=ctx.optimizer)
    _measure(benchmark, ctx, row, step, real)


def test_cd_iteration_graph(benchmark, bench_ctx):
    """The whole iteration as one CUDA graph (``CDGraph``, with its own capturable Adam) on the graph backend."""
    ctx = bench_ctx
    if not ctx.cuda:
        pytest.skip("the whole-iteration CUDA graph needs a CUDA device")
    asked = ctx.config.getoption("--bench-backends")
    if asked and "graph" not in asked:
        pytest.skip("the graph backend is not among --bench-backends")
    batch, steps = ctx.train_batch, ctx.train_steps
    row = TrainResult(
        ITERATION_GRAPH_ROW, batch, steps, str(ctx.device), "cuda-events", sampler_backend="graph", iteration_graph=True
    )
    real = uniform((batch, *ctx.model.input_shape), ctx.device, 7)
    step = CDIteration(ctx.model, "graph", batch, steps, ctx.device, seed=0, iteration_graph=True)
    _measure(benchmark, ctx, row, step, real)
