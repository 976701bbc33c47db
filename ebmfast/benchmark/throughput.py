"""Sampler throughput per backend (``ebmfast bench``'s first table).

For each (batch, steps) cell, every backend runs the same chains from the same start. The first call
(torch.compile, CUDA-graph capture) is timed apart from the steady state. Steady-state calls are interleaved across
backends round by round (order rotated each round), so a slow phase of a noisy machine hits every backend alike;
medians (and 20/80 % quantiles) over rounds are reported: sample-steps/s (= batch x steps / time), ratio to the eager
backend measured in the same run, ms per chain (one call: ``steps`` steps of the whole batch), achieved TFLOP/s from
the analytic count (``flops.py``) and its fraction of the measured fp32 and TF32 matmul peak, peak memory
(``timing.py``). Nothing here asserts a speed.

``bench_sampler_distributed`` (``torchrun ... -m ebmfast bench --distributed``): every rank runs the same chains on
its own device at the same time; before each timed call all ranks meet at a barrier, so the calls of one round run
together. Per round, the aggregate is all ranks' sample-steps divided by the slowest rank's time; the table gives
its median over rounds and each rank's own median sample-steps/s.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..devices import resolve_device
from ..sampler import BACKENDS, LangevinSampler, resolve_backend
from .flops import flops_per_sample_step
from .timing import (
    Memory,
    TimedRow,
    progress_bar,
    record_failure,
    rotations,
    telemetry_for,
    time_call,
    uniform,
    wall_call,
)

__all__ = [
    "CONCRETE_BACKENDS",
    "available_backends",
    "SamplerResult",
    "bench_sampler",
    "DistributedSamplerResult",
    "bench_sampler_distributed",
]

CONCRETE_BACKENDS = tuple(b for b in BACKENDS if b != "auto")


def available_backends(device: torch.device, requested=None) -> tuple[list[str], dict[str, str]]:
    """(usable backends in ``CONCRETE_BACKENDS`` order, {unusable backend: reason}) on ``device``.

    ``requested``: a subset to check (default: all of them); ``auto`` is resolved to its concrete backend."""
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


@dataclass
class SamplerResult(TimedRow):
    first_call_s: float | None = None  # compile / capture + one chain, wall clock with device sync
    sample_steps_per_s: float | None = None
    ms_per_chain: float | None = None
    flop_per_sample_step: float | None = None
    tflops: float | None = None
    frac_fp32_peak: float | None = None
    frac_tf32_peak: float | None = None
    peak_mem_mb: float | None = None  # CUDA: allocator peak in a steady call above the pre-sampler baseline
    first_call_mem_mb: float | None = None  # same, during the first call (compile / capture)
    mem_kind: str = ""

    def finish(self, flop_per_sample_step: float | None, peak: dict | None) -> None:
        if not self.summarise():
            return
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
    bar = progress_bar(len(cells) * len(backends) * (rounds + 1), "sampler", progress)
    t_start = time.perf_counter()
    for batch, steps in cells:
        rows = {b: SamplerResult(b, batch, steps, str(device), timer) for b in backends}
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            for b in backends:
                rows[b].skipped = f"time budget {time_budget_s:.0f} s spent"
            results.extend(rows.values())
            bar.update(len(backends) * (rounds + 1))
            continue
        x = uniform((batch, *sample_shape), device, seed + batch)
        samplers, sampler, s = {}, None, None
        with telemetry_for(device, telemetry) as tel:
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
                    with Memory(device, base) as mem_first:
                        rows[b].first_call_s = wall_call(partial(sampler.sample, x, steps), device)
                    with Memory(device, base) as mem:
                        t = time_call(partial(sampler.sample, x, steps), device)
                except Exception as exc:  # one broken backend must not lose the other measurements
                    record_failure(rows[b], exc)
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
            for order in rotations([b for b in backends if b in samplers], rounds):
                for b in order:
                    if b not in samplers:
                        continue
                    s = samplers[b]
                    try:
                        rows[b].times_s.append(time_call(partial(s.sample, x, steps), device))
                    except Exception as exc:
                        record_failure(rows[b], exc)
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


@dataclass
class DistributedSamplerResult:
    backend: str
    batch: int  # chains per rank
    steps: int
    world_size: int
    devices: list = field(default_factory=list)  # per rank
    times_s: list = field(default_factory=list)  # per rank: steady-state seconds per call, one per round
    first_call_s: list = field(default_factory=list)  # per rank
    rank_sample_steps_per_s: list = field(default_factory=list)  # per rank: batch x steps / own median
    aggregate_sample_steps_per_s: float | None = None  # median over rounds of all ranks' work / slowest rank's time
    slowest_ms_per_call: float | None = None  # median over rounds of the slowest rank's time
    skipped: str | None = None

    def finish(self) -> None:
        rounds = min((len(t) for t in self.times_s), default=0)
        if not rounds:
            return
        work = self.batch * self.steps
        self.rank_sample_steps_per_s = [work / statistics.median(t) for t in self.times_s]
        slowest = [max(t[i] for t in self.times_s) for i in range(rounds)]
        self.slowest_ms_per_call = statistics.median(slowest) * 1e3
        self.aggregate_sample_steps_per_s = statistics.median(self.world_size * work / s for s in slowest)


def bench_sampler_distributed(
    model: nn.Module,
    device: torch.device,
    ctx,
    backends,
    batches,
    steps_list,
    rounds: int = 5,
    precision: str = "fp32",
    sample_shape=None,
    seed: int = 0,
    progress: bool = True,
    compile_kwargs: dict | None = None,
) -> list[DistributedSamplerResult] | None:
    """Every rank of ``ctx`` (``ebmfast.training.distributed.DistContext``) measures the same cells on its own
    ``device``, in lockstep (a barrier before every timed call). Returns the results on rank 0, None elsewhere. A
    backend that fails its first call on any rank is reported as failed and left out on every rank."""
    model = model.to(device)
    sample_shape = tuple(sample_shape or model.input_shape)
    backends = list(backends)
    cells = [(b, s) for b in batches for s in sorted(steps_list)]
    bar = progress_bar(len(cells) * len(backends) * (rounds + 1), "sampler (distributed)", progress and ctx.is_main)
    out: list[DistributedSamplerResult] = []
    for batch, steps in cells:
        x = uniform((batch, *sample_shape), device, seed + batch)
        samplers, first, failed = {}, {}, {}
        for b in backends:
            try:
                sampler = LangevinSampler(
                    model,
                    steps=steps,
                    backend=b,
                    precision=precision,
                    seed=seed + 7919 * ctx.rank,
                    compile_kwargs=compile_kwargs,
                )
                first[b] = wall_call(partial(sampler.sample, x, steps), device)
                samplers[b] = sampler
            except Exception as exc:  # one broken backend must not lose the others; every rank drops it
                failed[b] = f"failed on rank {ctx.rank}: {type(exc).__name__}: {exc}"
            if ctx.agree_max(int(b in failed)):
                samplers.pop(b, None)
                failed.setdefault(b, "failed on another rank")
            bar.update(1)
        times = {b: [] for b in samplers}
        for order in rotations(list(samplers), rounds):
            for b in order:
                ctx.barrier("waiting for the other ranks' chains")
                times[b].append(time_call(partial(samplers[b].sample, x, steps), device))
                bar.update(1)
        gathered = ctx.gather_to_main({"device": str(device), "first": first, "times": times, "failed": failed})
        if gathered is not None:
            for b in backends:
                row = DistributedSamplerResult(b, batch, steps, ctx.world_size, [g["device"] for g in gathered])
                reasons = [g["failed"][b] for g in gathered if b in g["failed"]]
                if reasons:
                    row.skipped = next((r for r in reasons if r.startswith("failed on rank")), reasons[0])
                else:
                    row.times_s = [g["times"][b] for g in gathered]
                    row.first_call_s = [g["first"][b] for g in gathered]
                    row.finish()
                out.append(row)
        samplers = x = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return out if ctx.is_main else None
