"""How ``ebmfast bench`` and ``bench/*.py`` measure: device-side timers (CUDA events on GPU, ``perf_counter`` on CPU),
wall time with device synchronisation (compile / capture), peak memory (CUDA allocator peak, or RSS growth on CPU),
the measured dense-matmul peak (the denominator of "fraction of peak"), interleaved round orders, progress bars,
and GPU telemetry around a measurement.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import torch

__all__ = [
    "sync",
    "time_call",
    "wall_call",
    "quantile",
    "TimedRow",
    "RssSampler",
    "Memory",
    "measure_matmul_peak",
    "progress_bar",
    "rotations",
    "record_failure",
    "uniform",
    "telemetry_for",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds one ``fn()`` takes: CUDA events on ``device``'s current stream, else ``time.perf_counter``."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wall_call(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn()`` including all device work it queued (for compile/capture times)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class TimedRow:
    """What every benchmark row holds: the cell (backend, batch, steps, device), how it was timed, the steady-state
    seconds per call (one per round) and their summary (``summarise``), how it compares and what ran."""

    backend: str
    batch: int
    steps: int
    device: str
    timer: str  # "cuda-events" or "perf_counter"
    times_s: list = field(default_factory=list)  # steady-state seconds per call (one per round)
    median_s: float | None = None
    q20_s: float | None = None
    q80_s: float | None = None
    ratio_to_eager: float | None = None
    last_backend: str | None = None  # what the sampler reported it ran
    skipped: str | None = None
    telemetry: dict | None = None

    def summarise(self) -> bool:
        """Median and 20/80 % quantiles of ``times_s``; False (nothing set) when no round was timed."""
        if not self.times_s:
            return False
        self.median_s = statistics.median(self.times_s)
        self.q20_s, self.q80_s = quantile(self.times_s, 0.2), quantile(self.times_s, 0.8)
        return True


class RssSampler:
    """Peak resident-set growth of this process over a region (Linux /proc; None elsewhere)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_growth_mb: float | None = None

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _loop(self):
        while not self._stop.is_set():
            r = self.rss_bytes()
            if r is not None:
                self._peak = max(self._peak, r)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._base = self.rss_bytes()
        if self._base is None:
            return self
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        r = self.rss_bytes()
        if r is not None:
            self._peak = max(self._peak, r)
        self.peak_growth_mb = (self._peak - self._base) / 2**20


class Memory:
    """Peak memory of a region: CUDA allocator peak above ``base`` bytes, or RSS growth on CPU."""

    def __init__(self, device: torch.device, base: int | None = None):
        self.device = device
        self.base = base
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            if self.base is None:
                self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = RssSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.mb = self._rss.peak_growth_mb


def measure_matmul_peak(device: torch.device, n: int | None = None, reps: int | None = None, seed: int = 0) -> dict:
    """Measured dense matmul rate on ``device``: {"fp32_tflops", "tf32_tflops" (None on CPU), "n", "reps"}.

    Random data (zeros can run faster), several input pairs in rotation on CUDA so the L2 holds none of them,
    warm-up first, median over ``reps`` timed products."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = int(n or (8192 if cuda else 1024))
    reps = int(reps or (10 if cuda else 5))
    gen = torch.Generator(device=device).manual_seed(seed)
    pairs = 2 if cuda else 1
    mats = [
        (torch.randn(n, n, device=device, generator=gen), torch.randn(n, n, device=device, generator=gen))
        for _ in range(pairs)
    ]
    out = torch.empty(n, n, device=device)
    flop = 2.0 * n**3
    result = {"n": n, "reps": reps, "fp32_tflops": None, "tf32_tflops": None, "fp32_ms": None, "tf32_ms": None}
    modes = ("fp32", "tf32") if cuda else ("fp32",)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for mode in modes:
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            for i in range(3):
                a, b = mats[i % pairs]
                torch.mm(a, b, out=out)
            times = []
            for i in range(reps):
                a, b = mats[i % pairs]
                times.append(time_call(partial(torch.mm, a, b, out=out), device))
            t = statistics.median(times)
            result[f"{mode}_ms"] = t * 1e3
            result[f"{mode}_tflops"] = flop / t / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    mats = out = None  # free before the benchmarks allocate
    if cuda:
        torch.cuda.empty_cache()
    return result


def progress_bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except Exception:  # tqdm missing: no bar
        tqdm = None
    if tqdm is None or not enabled:

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=1.0, leave=False)


def rotations(names: list[str], rounds: int):
    """Yield ``rounds`` orders of ``names``, each rotated by one: every backend goes first equally often, so slow
    drift of a noisy machine (load, clocks) falls on all of them alike."""
    for r in range(rounds):
        k = r % len(names) if names else 0
        yield names[k:] + names[:k]


def record_failure(row, exc: Exception) -> None:
    """Mark a measurement as failed (``skipped = "failed: ..."``), print the traceback, keep going."""
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    row.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    row.times_s = []


def uniform(shape, device, seed) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, device=device, generator=gen).mul_(2).sub_(1)


def telemetry_for(device: torch.device, enabled: bool):
    from .telemetry import Telemetry

    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return Telemetry(device_index=index, enabled=enabled and device.type == "cuda")
