"""pytest-benchmark setup for ``bench/``: run with ``pytest bench/ --benchmark-only`` (not part of ``pytest``'s
default ``testpaths = tests``).

Files named ``bench_*.py`` are collected here (pytest's default pattern is ``test_*.py``). Options choose the
matrix; defaults follow issue 4 (GPU: batch 1/128/1024/16384; CPU: 1/128; steps 60/256):

    pytest bench/ --benchmark-only --bench-device cuda --bench-batch 128 16384 --bench-steps 60 \
        --benchmark-json out.json

Each test stores its device-side timings (CUDA events on GPU) and the derived figures (sample-steps/s, ratio to
eager, TFLOP/s, fraction of the measured matmul peak, peak memory, first-call time, GPU telemetry) in
pytest-benchmark's ``extra_info``; pytest-benchmark's own statistics are wall-clock times of the same calls, each
ending with a device synchronisation. A summary table is printed at the end of the session.

Unlike ``tests/conftest.py`` this does not set ``TRITON_INTERPRET``: benchmarks measure the real paths.
"""

from __future__ import annotations

import pytest
import torch

DEFAULT_GPU_BATCHES = (1, 128, 1024, 16384)
DEFAULT_CPU_BATCHES = (1, 128)
DEFAULT_STEPS = (60, 256)


def pytest_addoption(parser):
    group = parser.getgroup("ebmfast-bench", "ebmfast benchmark matrix")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"), help="device to measure")
    group.addoption("--bench-backends", nargs="+", default=None, help="backends (default: all available)")
    group.addoption("--bench-batch", nargs="+", type=int, default=None, help="batch sizes")
    group.addoption("--bench-steps", nargs="+", type=int, default=None, help="chain lengths")
    group.addoption("--bench-rounds", type=int, default=None, help="timed calls per test (default 10 cuda, 5 cpu)")
    group.addoption("--bench-train-iters", type=int, default=None, help="timed CD iterations (default 20 / 5)")
    group.addoption("--bench-train-batch", type=int, default=128, help="CD batch size (the seed's: 128)")
    group.addoption("--bench-train-steps", type=int, default=60, help="Langevin steps per CD iteration (seed: 60)")
    group.addoption(
        "--bench-max-call-s",
        type=float,
        default=None,
        help="skip a backend at a cell whose estimated call time exceeds this (seconds)",
    )
    group.addoption("--bench-no-peak", action="store_true", help="skip the matmul peak measurement")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> torch.device:
    from ebmfast.devices import resolve_device

    return resolve_device(config.getoption("--bench-device"))


def _backends(config) -> list[str]:
    from ebmfast.benchmark.throughput import available_backends

    usable, unusable = available_backends(_device(config), config.getoption("--bench-backends"))
    if config.getoption("--bench-backends") and unusable:
        raise pytest.UsageError(f"unavailable backends on this device: {unusable}")
    if "eager" not in usable:
        usable.insert(0, "eager")  # every ratio is taken against eager, measured first in the same session
    return usable


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "backend" not in metafunc.fixturenames:
        return
    device = _device(config)
    backends = _backends(config)
    if "batch" in metafunc.fixturenames and "steps" in metafunc.fixturenames:
        batches = config.getoption("--bench-batch") or (
            DEFAULT_GPU_BATCHES if device.type == "cuda" else DEFAULT_CPU_BATCHES
        )
        steps = config.getoption("--bench-steps") or DEFAULT_STEPS
        # Order: cell by cell, eager first inside each cell, so each ratio uses an eager median of this run.
        cells = [(b, s, be) for b in batches for s in steps for be in backends]
        metafunc.parametrize(("batch", "steps", "backend"), cells, ids=[f"{be}-b{b}-k{s}" for b, s, be in cells])
    else:
        metafunc.parametrize("backend", backends)


class BenchContext:
    """Session-wide state: device, the seed CNN, the measured matmul peak, results so far (for ratios)."""

    def __init__(self, config):
        from ebmfast.models import CNNModel

        self.config = config
        self.device = _device(config)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(0)
        self.model = CNNModel().to(self.device)
        self.rounds = config.getoption("--bench-rounds") or (10 if self.cuda else 5)
        self.train_iters = config.getoption("--bench-train-iters") or (20 if self.cuda else 5)
        self.max_call_s = config.getoption("--bench-max-call-s")
        self.train_batch = config.getoption("--bench-train-batch")
        self.train_steps = config.getoption("--bench-train-steps")
        self.peak = None
        self.sampler_results = []  # ebmfast.benchmark.throughput.SamplerResult
        self.train_results = []  # ebmfast.benchmark.training.TrainResult
        self.optimizer = None  # shared by the training benchmarks (same model object: no re-compilation)

    def measure_peak(self):
        from ebmfast.benchmark.timing import measure_matmul_peak

        if self.peak is None and not self.config.getoption("--bench-no-peak"):
            self.peak = measure_matmul_peak(self.device)
        return self.peak

    def eager(self, kind: str, batch: int, steps: int):
        rows = self.sampler_results if kind == "sampler" else self.train_results
        for r in rows:
            if r.backend == "eager" and r.batch == batch and r.steps == steps and r.median_s:
                return r
        return None

    def per_step_estimate(self, backend: str, batch: int):
        times = [
            r.median_s / r.steps
            for r in self.sampler_results
            if r.backend == backend and r.batch == batch and r.median_s
        ]
        return max(times) if times else None


@pytest.fixture(scope="session")
def bench_ctx(request):
    ctx = BenchContext(request.config)
    request.config._ebmfast_bench = ctx
    return ctx


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ctx = getattr(config, "_ebmfast_bench", None)
    if ctx is None:
        return
    from ebmfast.benchmark.report import format_table, format_train_table

    tr = terminalreporter
    if ctx.peak:
        tf32 = f", tf32 {ctx.peak['tf32_tflops']:.2f}" if ctx.peak.get("tf32_tflops") else ""
        tr.write_line(f"measured matmul peak (n={ctx.peak['n']}): fp32 {ctx.peak['fp32_tflops']:.3f} TFLOP/s{tf32}")
    if ctx.sampler_results:
        tr.write_sep("-", f"ebmfast sampler throughput on {ctx.device} (median of {ctx.rounds} calls)")
        tr.write_line(format_table(ctx.sampler_results))
    if ctx.train_results:
        tr.write_sep("-", f"ebmfast CD training throughput on {ctx.device}")
        tr.write_line(format_train_table(ctx.train_results))
