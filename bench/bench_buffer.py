"""Replay-buffer draw + write-back per iteration (pytest-benchmark): the torch path against the fused Triton kernels
(``ReplayBuffer(fused=True)``, CUDA only), at the seed's capacity 8192 and batch 128, and at batch 8192.

    pytest bench/bench_buffer.py --benchmark-only --bench-device cuda

Timings are CUDA events around one draw + push (``extra_info["times_ms"]``); measurements only, nothing asserted.
The fused path stays opt-in until these numbers show it pays (docs: ebmfast/buffer.py).
"""

from __future__ import annotations

import statistics

import pytest

from ebmfast import ReplayBuffer, ops
from ebmfast.benchmark.timing import time_call


@pytest.mark.parametrize("batch", [128, 8192])
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_buffer_draw_push(benchmark, bench_ctx, batch, fused):
    device = bench_ctx.device
    if fused and (device.type != "cuda" or not ops.fused_replay_available(device)):
        pytest.skip("the fused replay-buffer kernels are measured on CUDA only")
    buf = ReplayBuffer((1, 28, 28), capacity=8192, device=device, fused=fused)
    for _ in range(3):  # warm-up: kernel compilation, allocator
        buf.push(buf.draw(batch))
    times = []

    def one_iteration():
        times.append(time_call(lambda: buf.push(buf.draw(batch)), device))

    benchmark.pedantic(one_iteration, rounds=max(bench_ctx.rounds, 20), iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        {
            "fused": fused,
            "batch": batch,
            "capacity": 8192,
            "device": str(device),
            "timer": "cuda-events" if device.type == "cuda" else "perf_counter",
            "times_ms": [t * 1e3 for t in times],
            "median_ms": statistics.median(times) * 1e3,
        }
    )
    benchmark.group = f"replay buffer draw+push b{batch}"
