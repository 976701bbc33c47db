"""Throughput measurements of the Langevin sampler and of contrastive-divergence training, per backend.

Used by ``ebmfast bench`` (this module's ``add_arguments`` / ``run``), by ``bench/*.py`` (pytest-benchmark) and by
``bench/device_check.sh``. What is measured, and how:

- **Sampler**: for each (batch, steps) cell, every backend runs the same chains from the same start. The first call
  (torch.compile, CUDA-graph capture) is timed apart from the steady state. Steady-state calls are interleaved
  across backends round by round (order rotated each round), so a slow phase of a noisy machine hits every backend
  alike; medians (and 20/80 % quantiles) over rounds are reported. On CUDA each call is timed with CUDA events
  (``torch.cuda.Event``); on CPU with ``time.perf_counter``. Reported: sample-steps/s (= batch x steps / time),
  ratio to the eager backend measured in the same run, ms per chain (one call: ``steps`` steps of the whole batch),
  achieved TFLOP/s from the analytic count (``ebmfast.flops``) and its fraction of the measured fp32 and TF32 matmul
  peak, peak memory.
- **Peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` during a steady call, minus what was allocated before
  the backend's sampler existed (so a CUDA graph's private pool counts). CPU: growth of the process RSS during the
  first and during a steady call (sampled every 2 ms); a rough figure, since the allocator reuses freed memory.
- **Matmul peak**: median of an n x n x n float32 matrix product on random data, with TF32 off and on (CUDA);
  CPU: float32 only.
- **Training**: one contrastive-divergence iteration of the seed's recipe (replay-buffer draw, K-step chain,
  write-back, loss ``alpha*(real^2 + fake^2).mean() + fake.mean() - real.mean()``, Adam step) per backend, on
  synthetic real images in [-1, 1] (throughput does not depend on the data); iterations/s and the projected wall
  time of the seed's 60-epoch MNIST run (468 iterations per epoch). Self-contained: it does not use the trainer, so
  it runs where the data set or optional packages are missing.
- **Telemetry** (CUDA): ``ebmfast.telemetry`` samples SM clock, power, memory used and temperature during each cell.

Nothing here asserts a speed: these are measurements, reported as found.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .flops import flops_per_sample_step

__all__ = [
    "SEED_EPOCHS",
    "SEED_ITERS_PER_EPOCH",
    "SamplerResult",
    "TrainResult",
    "available_backends",
    "resolve_device",
    "measure_matmul_peak",
    "bench_sampler",
    "bench_train",
    "CDIteration",
    "format_table",
    "format_train_table",
    "write_csv_history",
    "environment",
    "target_report",
    "summarize_device_check",
    "add_arguments",
    "run",
]

SEED_EPOCHS = 60
SEED_ITERS_PER_EPOCH = 468  # 60,000 MNIST images / batch 128, drop_last
CONCRETE_BACKENDS = ("eager", "compiled", "fused", "graph")
GPU_BATCHES = (1, 128, 1024, 16384)
CPU_BATCHES = (1, 128)
DEFAULT_STEPS = (60, 256)


# ------------------------------------------------------------------------------------------------ devices, timing
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available else cpu; ``cuda`` without CUDA raises ``ValueError``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {str(device)!r}")
    return dev


def available_backends(device: torch.device, requested=None) -> tuple[list[str], dict[str, str]]:
    """(usable backends in ``CONCRETE_BACKENDS`` order, {unusable backend: reason}) on ``device``.

    ``requested``: a subset to check (default: all of them); ``auto`` is resolved to its concrete backend."""
    from .sampler import BACKENDS, resolve_backend

    names = list(requested) if requested else list(CONCRETE_BACKENDS)
    usable, unusable = [], {}
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
        try:
            concrete = resolve_backend(name, device)
        except (RuntimeError, ValueError) as exc:
            unusable[name] = str(exc)
            continue
        if concrete not in usable:
            usable.append(concrete)
    usable.sort(key=lambda b: CONCRETE_BACKENDS.index(b) if b in CONCRETE_BACKENDS else len(CONCRETE_BACKENDS))
    return usable, unusable


def _sync(device: torch.device) -> None:
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
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class _RssSampler:
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


class _Memory:
    """Peak memory of a region: CUDA allocator peak above ``base`` bytes, or RSS growth on CPU."""

    def __init__(self, device: torch.device, base: int | None = None):
        self.device = device
        self.base = base
        self.mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            if self.base is None:
                self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = _RssSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self._rss.__exit__(*exc)
            self.mb = self._rss.peak_growth_mb


# ------------------------------------------------------------------------------------------------ matmul peak
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
                times.append(time_call(lambda: torch.mm(a, b, out=out), device))
            t = statistics.median(times)
            result[f"{mode}_ms"] = t * 1e3
            result[f"{mode}_tflops"] = flop / t / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    mats = out = None  # free before the benchmarks allocate
    if cuda:
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ sampler
@dataclass
class SamplerResult:
    backend: str
    batch: int
    steps: int
    device: str
    timer: str  # "cuda-events" or "perf_counter"
    times_s: list = field(default_factory=list)  # steady-state seconds per call (one per round)
    first_call_s: float | None = None  # compile / capture + one chain, wall clock with device sync
    median_s: float | None = None
    q20_s: float | None = None
    q80_s: float | None = None
    sample_steps_per_s: float | None = None
    ratio_to_eager: float | None = None
    ms_per_chain: float | None = None
    flop_per_sample_step: float | None = None
    tflops: float | None = None
    frac_fp32_peak: float | None = None
    frac_tf32_peak: float | None = None
    peak_mem_mb: float | None = None  # CUDA: allocator peak in a steady call above the pre-sampler baseline
    first_call_mem_mb: float | None = None  # same, during the first call (compile / capture)
    mem_kind: str = ""
    last_backend: str | None = None  # what the sampler reported it ran
    skipped: str | None = None
    telemetry: dict | None = None

    def finish(self, flop_per_sample_step: float | None, peak: dict | None) -> None:
        if not self.times_s:
            return
        self.median_s = statistics.median(self.times_s)
        self.q20_s = _quantile(self.times_s, 0.2)
        self.q80_s = _quantile(self.times_s, 0.8)
        self.sample_steps_per_s = self.batch * self.steps / self.median_s
        self.ms_per_chain = self.median_s * 1e3
        if flop_per_sample_step:
            self.flop_per_sample_step = flop_per_sample_step
            self.tflops = flop_per_sample_step * self.sample_steps_per_s / 1e12
            if peak:
                if peak.get("fp32_tflops"):
                    self.frac_fp32_peak = self.tflops / peak["fp32_tflops"]
                if peak.get("tf32_tflops"):
                    self.frac_tf32_peak = self.tflops / peak["tf32_tflops"]


def _progress(total: int, desc: str, enabled: bool):
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


def _rotations(names: list[str], rounds: int):
    """Yield ``rounds`` orders of ``names``, each rotated by one: every backend goes first equally often, so slow
    drift of a noisy machine (load, clocks) falls on all of them alike."""
    for r in range(rounds):
        k = r % len(names) if names else 0
        yield names[k:] + names[:k]


def _record_failure(row, exc: Exception) -> None:
    """Mark a measurement as failed (``skipped = "failed: ..."``), print the traceback, keep going."""
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    row.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    row.times_s = []


def _uniform(shape, device, seed) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, device=device, generator=gen).mul_(2).sub_(1)


def _telemetry(device: torch.device, enabled: bool):
    from .telemetry import Telemetry

    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return Telemetry(device_index=index, enabled=enabled and device.type == "cuda")


def bench_sampler(
    model: nn.Module,
    device,
    backends,
    batches,
    steps_list,
    rounds: int = 5,
    precision: str = "fp32",
    sample_shape=None,
    peak: dict | None = None,
    seed: int = 0,
    max_call_s: float | None = None,
    time_budget_s: float | None = None,
    telemetry: bool = True,
    progress: bool = True,
    compile_kwargs: dict | None = None,
) -> list[SamplerResult]:
    """Measure every backend at every (batch, steps) cell; see the module docstring for the method.

    ``max_call_s``: skip a (backend, cell) whose estimated steady call (from the same backend and batch at fewer
    steps, measured earlier in this run) exceeds it. ``time_budget_s``: cells not started within this many seconds
    are reported as skipped. Returns one ``SamplerResult`` per (cell, backend), eager first."""
    from .sampler import LangevinSampler

    device = resolve_device(device)
    model = model.to(device)
    if sample_shape is None:
        sample_shape = getattr(model, "input_shape", None)
        if sample_shape is None:
            raise ValueError("sample_shape is needed for a model without an input_shape attribute")
    sample_shape = tuple(sample_shape)
    backends = list(backends)
    if not backends:
        raise ValueError("no backend to measure")
    try:
        fpss = flops_per_sample_step(model, sample_shape)
    except Exception as exc:  # a model FlopCounterMode cannot follow: report throughput without FLOP/s
        print(f"ebmfast bench: FLOP count unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        fpss = None
    cells = [(b, s) for b in batches for s in sorted(steps_list)]
    timer = "cuda-events" if device.type == "cuda" else "perf_counter"
    results: list[SamplerResult] = []
    per_step_s: dict[tuple[str, int], float] = {}  # (backend, batch) -> steady seconds per step, for max_call_s
    bar = _progress(len(cells) * len(backends) * (rounds + 1), "sampler", progress)
    t_start = time.perf_counter()
    for batch, steps in cells:
        rows = {b: SamplerResult(b, batch, steps, str(device), timer) for b in backends}
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            for b in backends:
                rows[b].skipped = f"time budget {time_budget_s:.0f} s spent"
            results.extend(rows.values())
            bar.update(len(backends) * (rounds + 1))
            continue
        x = _uniform((batch, *sample_shape), device, seed + batch)
        samplers, sampler, s = {}, None, None
        with _telemetry(device, telemetry) as tel:
            # Phase 1, per backend: first call (compile / capture), then one steady call for memory.
            for b in backends:
                est = per_step_s.get((b, batch))
                if max_call_s is not None and est is not None and est * steps > max_call_s:
                    rows[b].skipped = f"estimated {est * steps:.1f} s per call > max_call_s={max_call_s:g}"
                    bar.update(rounds + 1)
                    continue
                try:
                    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
                    sampler = LangevinSampler(
                        model, steps=steps, backend=b, precision=precision, seed=seed, compile_kwargs=compile_kwargs
                    )
                    with _Memory(device, base) as mem_first:
                        rows[b].first_call_s = wall_call(lambda: sampler.sample(x, steps), device)
                    with _Memory(device, base) as mem:
                        t = time_call(lambda: sampler.sample(x, steps), device)
                except Exception as exc:  # one broken backend must not lose the other measurements
                    _record_failure(rows[b], exc)
                    bar.update(rounds + 1)
                    continue
                rows[b].first_call_mem_mb, rows[b].peak_mem_mb = mem_first.mb, mem.mb
                rows[b].mem_kind = (
                    "cuda max_memory_allocated above pre-sampler baseline"
                    if device.type == "cuda"
                    else "process RSS growth during the call (rough)"
                )
                rows[b].last_backend = sampler.last_backend
                per_step_s[(b, batch)] = t / steps
                samplers[b] = sampler
                bar.update(1)
            # Phase 2: steady state, backends interleaved, order rotated each round.
            for order in _rotations([b for b in backends if b in samplers], rounds):
                for b in order:
                    if b not in samplers:
                        continue
                    s = samplers[b]
                    try:
                        rows[b].times_s.append(time_call(lambda: s.sample(x, steps), device))
                    except Exception as exc:
                        _record_failure(rows[b], exc)
                        del samplers[b]
                    bar.update(1)
                bar.set_postfix_str(f"batch {batch} steps {steps}")
            active = [b for b in backends if b in samplers]
        summary = tel.summary() if device.type == "cuda" else None
        for b in active:
            rows[b].finish(fpss, peak)
            rows[b].telemetry = summary
            per_step_s[(b, batch)] = rows[b].median_s / steps
        eager = rows.get("eager")
        if eager is not None and eager.sample_steps_per_s:
            for row in rows.values():
                if row.sample_steps_per_s:
                    row.ratio_to_eager = row.sample_steps_per_s / eager.sample_steps_per_s
        results.extend(rows.values())
        # Free this cell's samplers (CUDA-graph pools included) before the next cell measures its baseline.
        samplers = sampler = s = x = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return results


# ------------------------------------------------------------------------------------------------ training
class CDIteration:
    """One contrastive-divergence iteration of the seed's recipe, as a callable on a real batch.

    Real images get N(0, 0.005^2) noise and are clamped; chains start from the replay buffer (5 % fresh uniform
    noise), run ``steps`` Langevin steps, are written back; loss = alpha*(real_out^2 + fake_out^2).mean()
    + fake_out.mean() - real_out.mean(); Adam(lr, betas=(0.0, 0.999)) steps. No host synchronisation inside
    (the loss stays a device tensor)."""

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
        from .buffer import ReplayBuffer
        from .sampler import LangevinSampler

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
        real_out, fake_out = self.model(torch.cat([real, fake], dim=0)).chunk(2, dim=0)
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
        self.q20_s, self.q80_s = _quantile(self.times_s, 0.2), _quantile(self.times_s, 0.8)
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
    real = _uniform((batch, *shape), device, seed + 7)
    timer = "cuda-events" if device.type == "cuda" else "perf_counter"
    rows = {b: TrainResult(b, batch, steps, str(device), timer) for b in backends}
    steps_fns = {}
    bar = _progress(len(backends) * (iters + 1), "train", progress)
    with _telemetry(device, telemetry) as tel:
        for b in backends:
            try:
                fn = CDIteration(
                    model, b, batch, steps, device, precision, seed, optimizer=optimizer, compile_kwargs=compile_kwargs
                )
                rows[b].first_iter_s = wall_call(lambda: fn(real), device)
            except Exception as exc:
                _record_failure(rows[b], exc)
                bar.update(iters + 1)
                continue
            rows[b].last_backend = fn.sampler.last_backend
            steps_fns[b] = fn
            bar.update(1)
        for order in _rotations([b for b in backends if b in steps_fns], iters):
            for b in order:
                if b not in steps_fns:
                    continue
                fn = steps_fns[b]
                try:
                    rows[b].times_s.append(time_call(lambda: fn(real), device))
                except Exception as exc:
                    _record_failure(rows[b], exc)
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


# ------------------------------------------------------------------------------------------------ reporting
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and device facts recorded with every result."""
    from . import __version__

    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ebmfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    try:  # shapes compiled after the first are dynamic by default (and remembered across processes by PGO)
        import torch._dynamo.config as dcfg

        env["dynamo_automatic_dynamic_shapes"] = getattr(dcfg, "automatic_dynamic_shapes", None)
        env["dynamo_automatic_dynamic_local_pgo"] = getattr(dcfg, "automatic_dynamic_local_pgo", None)
    except Exception:
        pass
    if device.type == "cuda":
        from .telemetry import device_info

        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["nvml"] = device_info(device.index if device.index is not None else torch.cuda.current_device())
        env["driver"] = env["nvml"].get("driver")
    else:
        env["device_name"] = env["cpu"]
    return env


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def format_table(results: list[SamplerResult]) -> str:
    head = (
        f"{'backend':<9} {'batch':>6} {'steps':>5} {'sample-steps/s':>15} {'x eager':>8} {'ms/chain':>10} "
        f"{'TFLOP/s':>8} {'%fp32pk':>8} {'%tf32pk':>8} {'peak MB':>9} {'first s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.backend:<9} {r.batch:>6} {r.steps:>5}   skipped: {r.skipped}")
            continue
        mem = _fmt(r.peak_mem_mb, ".1f")
        if r.peak_mem_mb is not None and not r.device.startswith("cuda"):
            mem = f"rss+{r.peak_mem_mb:.0f}"
        lines.append(
            f"{r.backend:<9} {r.batch:>6} {r.steps:>5} {_fmt(r.sample_steps_per_s, ',.0f'):>15} "
            f"{_fmt(r.ratio_to_eager, '.2f'):>8} {_fmt(r.ms_per_chain, '.2f'):>10} {_fmt(r.tflops, '.3f'):>8} "
            f"{_fmt(None if r.frac_fp32_peak is None else 100 * r.frac_fp32_peak, '.1f'):>8} "
            f"{_fmt(None if r.frac_tf32_peak is None else 100 * r.frac_tf32_peak, '.1f'):>8} "
            f"{mem:>9} {_fmt(r.first_call_s, '.2f'):>8}"
        )
    return "\n".join(lines)


def format_train_table(results: list[TrainResult]) -> str:
    head = f"{'backend':<9} {'batch':>6} {'steps':>5} {'CD it/s':>9} {'x eager':>8} {'ms/it':>9} {'60 ep (min)':>12} {'first s':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.backend:<9} {r.batch:>6} {r.steps:>5}   skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.backend:<9} {r.batch:>6} {r.steps:>5} {_fmt(r.iters_per_s, '.2f'):>9} {_fmt(r.ratio_to_eager, '.2f'):>8} "
            f"{_fmt(None if r.median_s is None else r.median_s * 1e3, '.1f'):>9} "
            f"{_fmt(r.projected_60_epochs_min, '.1f'):>12} {_fmt(r.first_iter_s, '.2f'):>8}"
        )
    return "\n".join(lines)


CSV_FIELDS = (
    "kernel",
    "provider",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "y_50",
    "y_20",
    "y_80",
    "extra_benchmark_config_str",
    "device_name",
    "timestamp",
    "ebmfast_version",
    "torch_version",
    "triton_version",
)


def csv_rows(env: dict, sampler: list[SamplerResult], train: list[TrainResult], precision: str) -> list[dict]:
    """Long-format rows (one measurement per row), in the style of Liger-Kernel's benchmark history."""
    common = {
        "device_name": env.get("device_name"),
        "timestamp": env.get("time"),
        "ebmfast_version": env.get("ebmfast"),
        "torch_version": env.get("torch"),
        "triton_version": env.get("triton"),
    }
    rows = []
    for r in sampler:
        if r.skipped or r.median_s is None:
            continue
        cfg = json.dumps({"steps": r.steps, "precision": precision, "timer": r.timer, "rounds": len(r.times_s)})
        base = dict(
            common,
            kernel="langevin_sample",
            provider=r.backend,
            x_name="batch",
            x_value=r.batch,
            extra_benchmark_config_str=cfg,
        )
        n = r.batch * r.steps
        rows.append(
            dict(
                base,
                metric="throughput",
                unit="sample-steps/s",
                y_50=n / r.median_s,
                y_20=n / r.q80_s,
                y_80=n / r.q20_s,
            )
        )
        rows.append(dict(base, metric="time", unit="ms", y_50=r.median_s * 1e3, y_20=r.q20_s * 1e3, y_80=r.q80_s * 1e3))
        rows.append(
            dict(base, metric="first_call", unit="s", y_50=r.first_call_s, y_20=r.first_call_s, y_80=r.first_call_s)
        )
        if r.peak_mem_mb is not None:
            unit = "MB" if r.device.startswith("cuda") else "MB (RSS growth)"
            rows.append(
                dict(base, metric="memory", unit=unit, y_50=r.peak_mem_mb, y_20=r.peak_mem_mb, y_80=r.peak_mem_mb)
            )
    for r in train:
        if r.skipped or r.median_s is None:
            continue
        cfg = json.dumps({"steps": r.steps, "precision": precision, "timer": r.timer, "iters": len(r.times_s)})
        base = dict(
            common,
            kernel="cd_iteration",
            provider=r.backend,
            x_name="batch",
            x_value=r.batch,
            extra_benchmark_config_str=cfg,
        )
        rows.append(
            dict(
                base, metric="throughput", unit="iterations/s", y_50=1 / r.median_s, y_20=1 / r.q80_s, y_80=1 / r.q20_s
            )
        )
    return rows


def write_csv_history(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
        if header != list(CSV_FIELDS):
            raise ValueError(f"{path} exists with columns {header}, expected {list(CSV_FIELDS)}: use a new file")
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})


# ------------------------------------------------------------------------------------------------ CLI
def _int_list(text: str) -> list[int]:
    return [int(v) for v in str(text).replace(",", " ").split()]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to measure (auto: cuda when available)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        metavar="NAME",
        help="backends to measure (default: every backend available on the device; "
        "eager is always added as the reference)",
    )
    parser.add_argument(
        "--batch",
        nargs="+",
        type=int,
        default=None,
        metavar="N",
        help=f"batch sizes (default: {' '.join(map(str, GPU_BATCHES))} on cuda, "
        f"{' '.join(map(str, CPU_BATCHES))} on cpu)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=None,
        metavar="K",
        help=f"chain lengths (default: {' '.join(map(str, DEFAULT_STEPS))})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed steady-state calls per backend and cell, interleaved (default: 10 cuda, 5 cpu)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "tf32", "bf16"),
        help="sampler precision (fp32 is the parity target)",
    )
    parser.add_argument("--hidden-features", type=int, default=32, help="width of the seed CNN (default 32)")
    parser.add_argument(
        "--no-train", dest="train", action="store_false", help="skip the contrastive-divergence training measurement"
    )
    parser.add_argument("--train-batch", type=int, default=128, help="CD batch size (the seed's: 128)")
    parser.add_argument("--train-steps", type=int, default=60, help="Langevin steps per CD iteration (seed: 60)")
    parser.add_argument(
        "--train-iters", type=int, default=None, help="timed CD iterations per backend (default: 20 cuda, 5 cpu)"
    )
    parser.add_argument(
        "--compile-static",
        action="store_true",
        help="compile the energy gradient with dynamic=False (a static graph per batch size) instead of "
        "torch.compile's default automatic-dynamic shapes",
    )
    parser.add_argument(
        "--no-peak", dest="peak", action="store_false", help="skip the matmul peak measurement (no %%-of-peak columns)"
    )
    parser.add_argument(
        "--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 cuda, 1024 cpu)"
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="skip a backend at a cell whose estimated call time exceeds this many seconds",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="sampler cells not started within this many seconds are reported as skipped",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads); default: torch's own choice",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, inputs and chains")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write all results as JSON to FILE")
    parser.add_argument(
        "--csv",
        default=None,
        metavar="FILE",
        help="append long-format rows (kernel, provider, metric, unit, x, y50/y20/y80, ...) to FILE",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    parser.add_argument(
        "--no-telemetry", dest="telemetry", action="store_false", help="do not sample GPU telemetry through NVML"
    )


def _usage(msg: str):
    from .cli import UsageError

    return UsageError(msg)


def run(args) -> int:
    from .models import CNNModel

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    cuda = device.type == "cuda"
    try:
        backends, unusable = available_backends(device, args.backends)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    if args.backends and unusable:
        name, why = next(iter(unusable.items()))
        raise _usage(f"backend {name!r} is not available on {device}: {why}")
    if "eager" not in backends:
        backends.insert(0, "eager")  # the reference every ratio is taken against
    batches = args.batch or list(GPU_BATCHES if cuda else CPU_BATCHES)
    steps_list = args.steps or list(DEFAULT_STEPS)
    for name, values in (("--batch", batches), ("--steps", steps_list)):
        if any(v <= 0 for v in values):
            raise _usage(f"{name} values must be positive integers, got {values}")
    rounds = args.rounds if args.rounds is not None else (10 if cuda else 5)
    iters = args.train_iters if args.train_iters is not None else (20 if cuda else 5)
    if rounds < 1 or iters < 1:
        raise _usage(f"--rounds and --train-iters must be >= 1, got {rounds} and {iters}")

    if args.threads is not None:
        if args.threads < 1:
            raise _usage(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = CNNModel(hidden_features=args.hidden_features).to(device)
    env = environment(device)
    print(
        f"ebmfast bench on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}; "
        f"backends {', '.join(backends)}" + (f"; unavailable: {', '.join(unusable)}" if unusable else ""),
        flush=True,
    )
    if not cuda:
        print(
            f"cpu: {env['cpu_count']} cores, {env['torch_threads']} torch threads, load average (1 min) "
            f"{_fmt(env['loadavg_1m'], '.2f')} at start",
            flush=True,
        )
    peak = None
    if args.peak:
        peak = measure_matmul_peak(device, n=args.peak_n)
        tf32 = f", tf32 {peak['tf32_tflops']:.2f}" if peak["tf32_tflops"] else ""
        print(f"measured matmul peak (n={peak['n']}): fp32 {peak['fp32_tflops']:.3f} TFLOP/s{tf32}", flush=True)
    fpss = flops_per_sample_step(model, model.input_shape)
    print(f"work per sample-step (forward + input gradient): {fpss / 1e6:.3f} MFLOP", flush=True)

    compile_kwargs = {"dynamic": False} if args.compile_static else None
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")} | {
        "device": str(device),
        "backends": backends,
        "batch": batches,
        "steps": steps_list,
        "rounds": rounds,
        "train_iters": iters,
    }

    def document(sampler_results, train_results, complete):
        return {
            "complete": complete,  # False: written after the sampler part, training still to come
            "environment": env,
            "config": config,
            "matmul_peak": peak,
            "flop_per_sample_step": fpss,
            "sampler": [asdict(r) for r in sampler_results],
            "train": [asdict(r) for r in train_results],
        }

    def write_json(doc):
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=2, default=str)
            os.replace(tmp, args.json)

    sampler_results = bench_sampler(
        model,
        device,
        backends,
        batches,
        steps_list,
        rounds=rounds,
        precision=args.precision,
        peak=peak,
        seed=args.seed,
        max_call_s=args.max_call_s,
        time_budget_s=args.time_budget_s,
        telemetry=args.telemetry,
        progress=args.progress,
        compile_kwargs=compile_kwargs,
    )
    # Written now as well, so a run killed during training (e.g. by a stage timeout) keeps its sampler figures.
    write_json(document(sampler_results, [], complete=not args.train))
    train_results = []
    if args.train:
        train_results = bench_train(
            model,
            device,
            backends,
            batch=args.train_batch,
            steps=args.train_steps,
            iters=iters,
            precision=args.precision,
            seed=args.seed,
            telemetry=args.telemetry,
            progress=args.progress,
            compile_kwargs=compile_kwargs,
        )

    env["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print()
    if not cuda:
        print(f"load average (1 min) at end {_fmt(env['loadavg_1m_end'], '.2f')}")
    print(f"Sampler ({args.precision}, {rounds} interleaved rounds, median; {sampler_results[0].timer})")
    print(format_table(sampler_results))
    if train_results:
        print()
        print(
            f"Contrastive-divergence training (batch {args.train_batch}, {args.train_steps} steps, {iters} "
            f"iterations, median); 60 ep = projected {SEED_EPOCHS} x {SEED_ITERS_PER_EPOCH} iterations"
        )
        print(format_train_table(train_results))
    doc = document(sampler_results, train_results, complete=True)
    print()
    print("Targets of issue 4 (measured, not asserted):")
    for line in target_report(doc):
        print("  " + line)
    if args.json:
        write_json(doc)
        print(f"\nwrote {args.json}")
    if args.csv:
        write_csv_history(args.csv, csv_rows(env, sampler_results, train_results, args.precision))
        print(f"appended to {args.csv}")
    failed = [r for r in sampler_results + train_results if (r.skipped or "").startswith("failed")]
    if failed:
        print(f"ebmfast bench: {len(failed)} measurement(s) failed (tracebacks above)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ device check
GPU_TARGETS = (
    "batch 128, 60 steps: graph >= 20x eager sample-steps/s (same run)",
    "batch 16384: >= 40% of measured fp32 matmul peak in achieved FLOP/s (TF32 reported separately)",
    "seed's 60-epoch MNIST training (batch 128, 60 steps) projected <= 3 minutes",
    "graph peak memory <= 2x eager at batch 128 (60 steps)",
)
CPU_TARGET = "CPU, batch 128, 60 steps: best backend >= 1.5x eager sample-steps/s (aim 2x)"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_report(doc: dict) -> list[str]:
    """Issue 4's targets judged from an ``ebmfast bench --json`` document: the GPU targets for a CUDA run, the
    CPU target for a CPU run. Reported, never asserted."""
    rows = [r for r in doc.get("sampler", []) if r.get("median_s")]
    cell = {(r["backend"], r["batch"], r["steps"]): r for r in rows}
    device = str(doc.get("environment", {}).get("device", ""))
    if not device.startswith("cuda"):
        e = cell.get(("eager", 128, 60))
        others = [r for (b, n, k), r in cell.items() if n == 128 and k == 60 and b != "eager"]
        best = max(others, key=lambda r: r["ratio_to_eager"] or 0.0, default=None)
        ok = None if (e is None or best is None) else best["ratio_to_eager"] >= 1.5
        return [
            f"[{_verdict(ok)}] {CPU_TARGET}: "
            + ("n/a" if ok is None else f"{best['ratio_to_eager']:.2f}x ({best['backend']})")
        ]
    lines = []
    g, e = cell.get(("graph", 128, 60)), cell.get(("eager", 128, 60))
    ratio = g["ratio_to_eager"] if g and e else None
    lines.append(
        f"[{_verdict(None if ratio is None else ratio >= 20)}] {GPU_TARGETS[0]}: "
        + ("n/a" if ratio is None else f"{ratio:.1f}x")
    )
    big = [r for r in rows if r["batch"] == 16384 and r.get("frac_fp32_peak") is not None]
    best = max(big, key=lambda r: r["frac_fp32_peak"], default=None)
    lines.append(
        f"[{_verdict(None if best is None else best['frac_fp32_peak'] >= 0.4)}] {GPU_TARGETS[1]}: "
        + (
            "n/a"
            if best is None
            else f"{100 * best['frac_fp32_peak']:.1f}% fp32 / "
            f"{_fmt(None if best.get('frac_tf32_peak') is None else 100 * best['frac_tf32_peak'], '.1f')}% "
            f"tf32 ({best['backend']}, {best['steps']} steps, {best['tflops']:.2f} TFLOP/s)"
        )
    )
    train = [
        r for r in doc.get("train", []) if r.get("projected_60_epochs_min") and r["batch"] == 128 and r["steps"] == 60
    ]
    bt = min(train, key=lambda r: r["projected_60_epochs_min"], default=None)
    lines.append(
        f"[{_verdict(None if bt is None else bt['projected_60_epochs_min'] <= 3.0)}] {GPU_TARGETS[2]}: "
        + ("n/a" if bt is None else f"{bt['projected_60_epochs_min']:.2f} min ({bt['backend']})")
    )
    gm, em = (g or {}).get("peak_mem_mb"), (e or {}).get("peak_mem_mb")
    mem_ok = None if (gm is None or not em) else gm <= 2 * em
    lines.append(
        f"[{_verdict(mem_ok)}] {GPU_TARGETS[3]}: "
        + ("n/a" if mem_ok is None else f"graph {gm:.1f} MB vs eager {em:.1f} MB ({gm / em:.2f}x)")
    )
    return lines


def _junit_counts(path: str) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    text = f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"
    bad = [
        f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    if bad:
        text += "; failing: " + ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
    return text


def _junit_reports(path: str, tag: str = "PRECISION") -> list[str]:
    """Lines starting with ``tag`` that tests printed (kept in the JUnit XML by ``-o junit_logging=system-out``)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    return [
        ln.strip()
        for out in root.iter("system-out")
        for ln in (out.text or "").splitlines()
        if ln.strip().startswith(tag)
    ]


def summarize_device_check(outdir: str) -> str:
    """The short table ``bench/device_check.sh`` prints last: stages, environment, sampler and training figures,
    the issue-4 targets. Reads OUTDIR/{stages.tsv, bench.json, pytest_benchmark.json, cuda_tests.xml}."""
    out = []
    stages_path = os.path.join(outdir, "stages.tsv")
    stages = []
    if os.path.exists(stages_path):
        with open(stages_path) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    stages.append(parts)
    doc = None
    try:
        with open(os.path.join(outdir, "bench.json")) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        pass
    env = (doc or {}).get("environment", {})
    out.append("== ebmfast device check ==")
    if doc is not None and doc.get("complete") is False:
        out.append("NOTE: bench.json is partial (the run stopped during the training measurement)")
    if env:
        out.append(
            f"{env.get('time')}  {env.get('device_name')}  driver {env.get('driver')}  torch {env.get('torch')}"
            f"  triton {env.get('triton')}  cuda {env.get('cuda')}  ebmfast {env.get('ebmfast')}"
        )
    stage_txt = []
    for name, rc, secs in stages:
        status = {"0": "ok", "skipped": "skipped", "124": "TIMEOUT", "137": "KILLED"}.get(rc, f"FAILED rc={rc}")
        stage_txt.append(f"{name} {status} {secs}s")
    out.append("stages: " + (" | ".join(stage_txt) if stage_txt else "none recorded"))
    counts = _junit_counts(os.path.join(outdir, "cuda_tests.xml"))
    out.append(f"GPU tests (-m 'cuda or device'): {counts or 'no result'}")
    out.extend("  " + ln for ln in _junit_reports(os.path.join(outdir, "cuda_tests.xml")))
    pb_path = os.path.join(outdir, "pytest_benchmark.json")
    if os.path.exists(pb_path):
        try:
            with open(pb_path) as fh:
                pb = json.load(fh)
            items = []
            for b in pb.get("benchmarks", []):
                info = b.get("extra_info", {})
                if info.get("ratio_to_eager") is not None and info.get("backend") != "eager":
                    items.append(
                        f"{info['backend']} b{info['batch']}"
                        + (f"k{info['steps']}" if "steps" in info else "")
                        + f" {info['ratio_to_eager']:.1f}x"
                    )
            out.append(
                f"pytest-benchmark: {len(pb.get('benchmarks', []))} benchmarks; ratios to eager: "
                + (", ".join(items) or "n/a")
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out.append(f"pytest-benchmark: unreadable ({type(exc).__name__})")
    if doc is None:
        out.append("bench.json: missing (see bench_cli.log)")
        return "\n".join(out)
    peak = doc.get("matmul_peak") or {}
    if peak:
        out.append(
            f"matmul peak (n={peak.get('n')}): fp32 {_fmt(peak.get('fp32_tflops'), '.2f')} TFLOP/s, "
            f"tf32 {_fmt(peak.get('tf32_tflops'), '.2f')} TFLOP/s; work per sample-step "
            f"{doc.get('flop_per_sample_step', 0) / 1e6:.3f} MFLOP"
        )
    out.append("")
    out.append(
        f"{'backend':<9}{'batch':>6}{'steps':>6}{'sample-steps/s':>15}{'x eager':>9}{'ms/chain':>10}"
        f"{'TFLOP/s':>9}{'%fp32':>7}{'%tf32':>7}{'peak MB':>9}{'first s':>9}"
    )
    for r in doc.get("sampler", []):
        if r.get("skipped") or not r.get("median_s"):
            out.append(f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}  skipped: {r.get('skipped')}")
            continue
        pct = lambda v: None if v is None else 100 * v
        out.append(
            f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}{r['sample_steps_per_s']:>15,.0f}"
            f"{_fmt(r.get('ratio_to_eager'), '.2f'):>9}{r['ms_per_chain']:>10.2f}{_fmt(r.get('tflops'), '.3f'):>9}"
            f"{_fmt(pct(r.get('frac_fp32_peak')), '.1f'):>7}{_fmt(pct(r.get('frac_tf32_peak')), '.1f'):>7}"
            f"{_fmt(r.get('peak_mem_mb'), '.1f'):>9}{_fmt(r.get('first_call_s'), '.2f'):>9}"
        )
    train = doc.get("train", [])
    if train:
        out.append("")
        out.append(f"{'train':<9}{'batch':>6}{'steps':>6}{'CD it/s':>10}{'x eager':>9}{'60 ep min':>11}{'first s':>9}")
        for r in train:
            if not r.get("median_s"):
                continue
            out.append(
                f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}{r['iters_per_s']:>10.2f}"
                f"{_fmt(r.get('ratio_to_eager'), '.2f'):>9}{r['projected_60_epochs_min']:>11.2f}"
                f"{_fmt(r.get('first_iter_s'), '.2f'):>9}"
            )
    tel = next((r.get("telemetry") for r in doc.get("sampler", []) if r.get("telemetry")), None)
    if tel and tel.get("available"):
        clk, pw, tc = tel.get("sm_clock_mhz") or {}, tel.get("power_w") or {}, tel.get("temperature_c") or {}
        out.append(
            f"telemetry (first cell): SM clock median {_fmt(clk.get('median'), '.0f')} MHz, power max "
            f"{_fmt(pw.get('max'), '.0f')} W, temperature max {_fmt(tc.get('max'), '.0f')} C"
        )
    elif tel:
        out.append(f"telemetry: unavailable ({tel.get('reason')})")
    out.extend(_profile_lines(os.path.join(outdir, "profile.json")))
    out.append("")
    out.append("targets (issue 4; measured, not asserted):")
    out.extend("  " + line for line in target_report(doc))
    return "\n".join(out)


def _profile_lines(path: str) -> list[str]:
    """A few lines from bench/profile_step.py's JSON: graph variants and kernels per step (empty when absent)."""
    try:
        with open(path) as fh:
            prof = json.load(fh)
    except (OSError, ValueError):
        return []
    out = ["", "profile (bench/profile_step.py; graph backend, median per chain):"]
    for r in prof.get("graph_variants", []):
        variant = " ".join(f"{k} {str(r[k]):<5}" for k in ("channels_last", "cudnn_benchmark") if k in r)
        out.append(
            f"  batch {r['batch']:>6} steps {r['steps']} {variant} "
            f"{r['precision']}: {r['us_per_step']:8.1f} us/step, {r['sample_steps_per_s']:>13,.0f} sample-steps/s"
        )
    for p in prof.get("profiles", []):
        top = p.get("top") or [{}]
        layout = " channels_last" if p.get("channels_last") else ""
        out.append(
            f"  {p['backend']}{layout} batch {p['batch']}: {p['kernels_per_step']:.1f} kernels/step, GPU busy "
            f"{p['busy_us_per_step']:.1f} of {p['chain_us_per_step']:.1f} us/step; top kernel "
            f"{top[0].get('name', '?')[:50]} {top[0].get('us_per_step', 0):.1f} us/step"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m ebmfast.bench``: the same as ``ebmfast bench``, without loading the other subcommands."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ebmfast.bench", description="measure sampler throughput")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .cli import UsageError

    try:
        return run(args)
    except UsageError as exc:
        print(f"ebmfast bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
