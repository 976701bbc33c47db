"""One Langevin step of the seed CNN on the layer kernels (``ebmfast/layers.py``, ``kernels/layers.py``) against the
compiled gradient + fused update (the ``fused`` backend's step), CUDA only (pytest-benchmark). Twin of
``kernels/layers.py``, ``ebmfast/layers.py`` and ``tests/test_layers.py``.

    pytest bench/bench_layers.py --benchmark-only --bench-device cuda [--bench-batch 128 16384]

Paths, each timed per step with CUDA events (``extra_info``):
- ``compiled+fused``: ``compiled_energy_grad(model)(x)`` then ``langevin.step_`` (two torch ops, cuDNN inside);
- ``layers``: ``LayerProgram.step_`` (the layer kernels, update fused into the last launch);
- ``*-graph``: 60 such steps captured in one CUDA graph, replay time / 60 (launch overhead gone, as in the
  sampler's graph backends).
Reported: median us per step, sample-steps/s, achieved TFLOP/s (analytic FLOP of forward + input gradient,
``ebmfast.flops``) and the fraction of the measured fp32 matmul peak, launches per step, first-call (compile) time.
Measurements only: nothing about speed is asserted.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from ebmfast import langevin
from ebmfast.benchmark.flops import flops_per_sample_step
from ebmfast.benchmark.timing import time_call, wall_call
from ebmfast.energy_grad import compiled_energy_grad
from ebmfast.layers import layer_program, unsupported_reason
from ebmfast.reference import SEED_STEP, sampling_mode
from ebmfast.sampler import precision_context

GRAPH_STEPS = 60
STEP = SEED_STEP  # the seed's step settings


def _batches(config):
    return config.getoption("--bench-batch") or [128, 16384]


def pytest_generate_tests(metafunc):  # pytest calls this per module too: the batch list comes from the CLI
    if "layer_batch" in metafunc.fixturenames:
        metafunc.parametrize("layer_batch", _batches(metafunc.config), ids=lambda b: f"b{b}")


def _step_fn(path, model, x, rng, precision):
    if path.startswith("layers"):
        program = layer_program(model, precision)
        program.prepare(x)
        return lambda k: program.step_(x, None, rng, STEP, noise_index=k + 1, add_noise=True), program
    grad = compiled_energy_grad(model, dynamic=False)

    def step(k):
        g = grad(x)
        langevin.step_(x, g, rng, STEP, noise_index=k + 1, add_noise=True)

    return step, None


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("path", ["compiled+fused", "layers", "compiled+fused-graph", "layers-graph"])
def test_layer_step(benchmark, bench_ctx, path, precision, layer_batch):
    device, model = bench_ctx.device, bench_ctx.model
    if device.type != "cuda":
        pytest.skip("the layer kernels are benchmarked on CUDA only")
    batch = layer_batch
    gen = torch.Generator(device=device).manual_seed(batch)
    x = torch.rand((batch, *model.input_shape), device=device, generator=gen) * 2 - 1
    reason = unsupported_reason(model, x, precision)
    if path.startswith("layers") and reason is not None:
        pytest.skip(reason)
    rng = torch.tensor([0, 0], dtype=torch.int64, device=device)
    peak = bench_ctx.measure_peak()
    times = []
    with sampling_mode(model), precision_context(precision, "cuda"), torch.no_grad():
        step, program = _step_fn(path, model, x, rng, precision)
        first = wall_call(lambda: step(0), device)  # compilation (Triton / torch.compile) and allocation
        for k in range(3):
            step(k)
        if path.endswith("graph"):
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for k in range(GRAPH_STEPS):  # warm-up on the capture stream
                    step(k)
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph, stream=side):
                for k in range(GRAPH_STEPS):
                    step(k)

            def one_round():
                times.append(time_call(graph.replay, device) / GRAPH_STEPS)
        else:

            def one_round():
                times.append(time_call(lambda: step(0), device))

        benchmark.pedantic(one_round, rounds=max(bench_ctx.rounds, 20), iterations=1, warmup_rounds=2)
    median = statistics.median(times)
    flops = flops_per_sample_step(model, model.input_shape) * batch
    info = {
        "path": path,
        "precision": precision,
        "batch": batch,
        "device_name": torch.cuda.get_device_name(device),
        "timer": "cuda-events",
        "us_per_step": [t * 1e6 for t in times],
        "median_us_per_step": median * 1e6,
        "sample_steps_per_s": batch / median,
        "tflops": flops / median / 1e12,
        "fraction_of_fp32_peak": (flops / median / 1e12) / peak["fp32_tflops"] if peak else None,
        "launches_per_step": program.launches_per_step if program is not None else None,
        "first_call_s": first,
    }
    benchmark.extra_info.update(info)
    benchmark.group = f"layer step b{batch} {precision}"
    print(
        f"LAYERS {path} {precision} b{batch}: {median * 1e6:.1f} us/step, {batch / median:,.0f} sample-steps/s, "
        f"{info['tflops']:.2f} TFLOP/s"
        + (f" ({100 * info['fraction_of_fp32_peak']:.1f} % of fp32 peak)" if peak else "")
        + (f", {program.launches_per_step} launches/step" if program is not None else "")
    )
