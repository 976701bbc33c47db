"""The whole K-step chain of the seed CNN as one persistent kernel (``ebmfast/persistent.py``,
``kernels/persistent.py``) against the layer kernels' chain in a CUDA graph (the ``triton`` backend's path), CUDA only
(pytest-benchmark). Twin of ``kernels/persistent.py``, ``ebmfast/persistent.py`` and ``tests/test_persistent.py``.

    pytest bench/bench_persistent.py --benchmark-only --bench-device cuda [--bench-batch 1 128 16384]
    EBMFAST_BENCH_PERSISTENT_SWEEP=1 pytest bench/bench_persistent.py ...   # also time a grid of launch settings

Paths, each timed per chain of ``K = 60`` steps with CUDA events (``extra_info``):
- ``persistent``: ``PersistentProgram.chain_`` (one launch) then the counter advance, called directly;
- ``persistent-graph``: the same captured in a CUDA graph (how the sampler runs a backend: no Python per call);
- ``layers-graph``: the layer program's chain (``LayerProgram.chain_``: 9 launches per step on the seed CNN) and the
  counter advance captured in a CUDA graph.
The sweep (``test_persistent_settings``) times ``persistent-graph`` for blocks 1-8 and 4 / 8 warps per batch: the
measurements that replace ``chain_settings``' reasoned default with a table.
Reported: median us per step, sample-steps/s, achieved TFLOP/s (analytic FLOP of forward + input gradient) and the
fraction of the measured fp32 matmul peak, launches per chain, first-call seconds (source generation + Triton
compilation) apart from steady state, the launch settings. Measurements only: nothing about speed is asserted.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from ebmfast.benchmark.flops import flops_per_sample_step
from ebmfast.benchmark.timing import time_call, wall_call
from ebmfast.chain import LayerStepper, run_chain_
from ebmfast.layers import layer_program
from ebmfast.persistent import PersistentProgram, unsupported_reason
from ebmfast.reference import SEED_STEP, sampling_mode
from ebmfast.sampler import precision_context

STEPS = 60
STEP = SEED_STEP  # the seed's step settings
SWEEP = os.environ.get("EBMFAST_BENCH_PERSISTENT_SWEEP") == "1"


def _batches(config):
    return config.getoption("--bench-batch") or [1, 128, 16384]


def pytest_generate_tests(metafunc):  # pytest calls this per module too: the batch list comes from the CLI
    if "chain_batch" in metafunc.fixturenames:
        metafunc.parametrize("chain_batch", _batches(metafunc.config), ids=lambda b: f"b{b}")


def _chain_fn(path, model, x, rng, precision, settings=None):
    """(one K-step chain on x in place, including the counter advance; the program)."""
    if path.startswith("persistent"):
        program = PersistentProgram(model, precision)
        program.prepare(x, settings)

        def chain():
            program.chain_(x, rng, STEPS, STEP)
            rng[1] += STEPS

        return chain, program
    program = layer_program(model, precision)
    program.prepare(x)
    stepper = LayerStepper(program, STEP)

    def chain():
        run_chain_(x, STEPS, rng, stepper)
        rng[1] += STEPS

    return chain, program


def _measure(bench_ctx, benchmark, path, precision, batch, settings=None):
    device, model = bench_ctx.device, bench_ctx.model
    if device.type != "cuda":
        pytest.skip("the persistent kernel is benchmarked on CUDA only")
    gen = torch.Generator(device=device).manual_seed(batch)
    x = torch.rand((batch, *model.input_shape), device=device, generator=gen) * 2 - 1
    reason = unsupported_reason(model, x, precision)
    if reason is not None:
        pytest.skip(reason)
    rng = torch.tensor([0, 0], dtype=torch.int64, device=device)
    peak = bench_ctx.measure_peak()
    times = []
    with sampling_mode(model), precision_context(precision, "cuda"), torch.no_grad():
        chain, program = _chain_fn(path, model, x, rng, precision, settings)
        first = wall_call(chain, device)  # source generation, Triton compilation, allocation
        chain()
        if path.endswith("graph"):
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                chain()  # warm-up on the capture stream
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph, stream=side):
                chain()
            run = graph.replay
        else:
            run = chain

        def one_round():
            times.append(time_call(run, device) / STEPS)

        benchmark.pedantic(one_round, rounds=max(bench_ctx.rounds, 10), iterations=1, warmup_rounds=2)
    median = statistics.median(times)
    flops = flops_per_sample_step(model, model.input_shape) * batch
    persistent = isinstance(program, PersistentProgram)
    st = program.settings(x) if persistent else None
    info = {
        "path": path,
        "precision": precision,
        "batch": batch,
        "steps": STEPS,
        "device_name": torch.cuda.get_device_name(device),
        "timer": "cuda-events",
        "us_per_step": [t * 1e6 for t in times],
        "median_us_per_step": median * 1e6,
        "sample_steps_per_s": batch / median,
        "tflops": flops / median / 1e12,
        "fraction_of_fp32_peak": (flops / median / 1e12) / peak["fp32_tflops"] if peak else None,
        "launches_per_chain": 1 if persistent else 1 + STEPS * program.launches_per_step,
        "first_call_s": first,
        "settings": st._asdict() if st is not None else None,
    }
    benchmark.extra_info.update(info)
    benchmark.group = f"chain b{batch} {precision}"
    print(
        f"PERSISTENT {path} {precision} b{batch}: {median * 1e6:.1f} us/step, {batch / median:,.0f} sample-steps/s, "
        f"{info['tflops']:.2f} TFLOP/s"
        + (f" ({100 * info['fraction_of_fp32_peak']:.1f} % of fp32 peak)" if peak else "")
        + f", {info['launches_per_chain']} launches/chain, first call {first:.1f} s"
        + (f", {st}" if st is not None else "")
    )


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("path", ["persistent", "persistent-graph", "layers-graph"])
def test_chain(benchmark, bench_ctx, path, precision, chain_batch):
    _measure(bench_ctx, benchmark, path, precision, chain_batch)


@pytest.mark.skipif(not SWEEP, reason="set EBMFAST_BENCH_PERSISTENT_SWEEP=1 to time the grid of launch settings")
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_persistent_settings(benchmark, bench_ctx, block, warps, chain_batch):
    from ebmfast.kernels.persistent import chain_settings
    from ebmfast.layers import plan_layers

    specs = plan_layers(bench_ctx.model, bench_ctx.model.input_shape)
    sms = torch.cuda.get_device_properties(bench_ctx.device).multi_processor_count if bench_ctx.cuda else None
    settings = chain_settings(specs, chain_batch, interpreted=False, sm_count=sms, block=block, num_warps=warps)
    _measure(bench_ctx, benchmark, "persistent-graph", "fp32", chain_batch, settings)
