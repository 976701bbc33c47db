"""Sampler throughput per backend x batch x steps (pytest-benchmark). Twin of ``kernels/langevin.py``,
``ebmfast/sampler.py`` and ``tests/test_langevin_kernel.py``.

    pytest bench/bench_langevin.py --benchmark-only [--bench-device cuda] [--bench-batch ...] [--bench-steps ...]

Per test: the first call (compile / CUDA-graph capture) is timed apart; one warm call measures peak memory; then
``--bench-rounds`` timed calls through ``benchmark.pedantic``. Each timed call is also timed with CUDA events on GPU
(``extra_info["times_ms"]``, ``extra_info["timer"] == "cuda-events"``); derived figures come from those event times.
Measurements only: nothing is asserted about speed.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from ebmfast.benchmark.flops import flops_per_sample_step
from ebmfast.benchmark.throughput import SamplerResult
from ebmfast.benchmark.timing import Memory, telemetry_for, time_call, uniform, wall_call
from ebmfast.sampler import LangevinSampler


def test_langevin_throughput(benchmark, bench_ctx, backend, batch, steps):
    ctx = bench_ctx
    device, model = ctx.device, ctx.model
    peak = ctx.measure_peak()
    row = SamplerResult(backend, batch, steps, str(device), "cuda-events" if ctx.cuda else "perf_counter")
    est = ctx.per_step_estimate(backend, batch)
    if ctx.max_call_s is not None and est is not None and est * steps > ctx.max_call_s:
        row.skipped = f"estimated {est * steps:.1f} s per call > --bench-max-call-s={ctx.max_call_s:g}"
        ctx.sampler_results.append(row)
        pytest.skip(row.skipped)

    x = uniform((batch, *model.input_shape), device, 1000 + batch)
    base = torch.cuda.memory_allocated(device) if ctx.cuda else None
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=0)
    with telemetry_for(device, True) as tel:
        with Memory(device, base) as mem_first:
            row.first_call_s = wall_call(lambda: sampler.sample(x, steps), device)
        with Memory(device, base) as mem:
            time_call(lambda: sampler.sample(x, steps), device)
        row.first_call_mem_mb, row.peak_mem_mb = mem_first.mb, mem.mb
        row.last_backend = sampler.last_backend

        def one_call():
            row.times_s.append(time_call(lambda: sampler.sample(x, steps), device))

        benchmark.pedantic(one_call, rounds=ctx.rounds, iterations=1, warmup_rounds=0)
    row.telemetry = tel.summary() if ctx.cuda else None
    row.finish(flops_per_sample_step(model, model.input_shape), peak)
    eager = ctx.eager("sampler", batch, steps)
    if eager is not None:
        row.ratio_to_eager = row.sample_steps_per_s / eager.sample_steps_per_s
    elif backend == "eager":
        row.ratio_to_eager = 1.0
    ctx.sampler_results.append(row)

    info = dataclasses.asdict(row)
    info["times_ms"] = [t * 1e3 for t in info.pop("times_s")]
    info["device_name"] = torch.cuda.get_device_name(device) if ctx.cuda else "cpu"
    info["matmul_peak"] = peak
    benchmark.extra_info.update(info)
    benchmark.group = f"langevin b{batch} k{steps}"
    sampler = x = one_call = None
    gc.collect()  # free the CUDA-graph pool before the next test measures its baseline
    if ctx.cuda:
        torch.cuda.empty_cache()
