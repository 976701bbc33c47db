"""Where the time of a Langevin step goes on a GPU (CUDA only; ``bench/device_check.sh`` runs it).

    python bench/profile_step.py [--batches 128 16384] [--steps 60] [--time-budget-s S] [--json FILE]

Two kinds of measurement, run in order of what the open targets need first, each skipped (and recorded as skipped)
once ``--time-budget-s`` is spent:

1. Chain variants (``chain_variants`` in the JSON): one warm call per chain, CUDA events, median of ``--reps``. The
   ``triton`` and ``persistent`` backends in fp32 / tf32 / bf16 (the reduced precisions are judged against their own
   fp32 figure), then ``graph`` with the compiled gradient in NCHW / channels-last layout
   (``LangevinSampler(channels_last=...)``) in fp32 / tf32.
2. ``torch.profiler`` over one warm chain (``profiles``): kernels per chain and per step, GPU busy time per step
   against the chain's time per step (the rest is launch gaps), and the kernels that take the most time; for
   ``triton``, ``persistent``, ``graph`` (NCHW and channels-last) and ``fused``.

Measurements only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from functools import partial

import torch

from ebmfast import CNNModel, LangevinSampler
from ebmfast.benchmark.timing import time_call, uniform

KERNEL_BACKENDS = ("triton", "persistent")


def plan(batches: list[int]) -> list[tuple]:
    """The measurements in the order they run: ("variant", backend, batch, channels_last, precision) and
    ("profile", backend, batch, channels_last). The largest batch's kernel-backend precisions come first (the
    throughput targets are judged there), then the profiles at the smallest batch (kernels per step), then the rest."""
    big, small = max(batches), min(batches)
    precisions = ("fp32", "tf32", "bf16")
    items: list[tuple] = [("variant", b, big, None, p) for b in KERNEL_BACKENDS for p in precisions]
    items += [("profile", b, small, None) for b in KERNEL_BACKENDS]
    items += [("profile", "graph", small, None)]
    rest = [n for n in batches if n != big]
    items += [("variant", b, n, None, p) for n in rest for b in KERNEL_BACKENDS for p in precisions]
    items += [("variant", "graph", n, cl, p) for n in sorted(batches) for cl in (False, True) for p in ("fp32", "tf32")]
    items += [("profile", "graph", small, True), ("profile", "fused", small, None)]
    return items


def chain_variant(model, batch, steps, reps, backend, channels_last, precision) -> dict:
    """Median CUDA-event time of one warm chain (a CUDA-graph replay for the captured backends)."""
    x = uniform((batch, *model.input_shape), torch.device("cuda"), batch)
    s = LangevinSampler(
        model,
        steps=steps,
        backend=backend,
        precision=precision,
        seed=0,
        check_finite=False,
        channels_last=channels_last,
    )
    t0 = time.perf_counter()
    s.sample(x)  # compile, capture and one chain
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    n = reps if batch < 4096 else max(3, reps // 2)
    times = [time_call(partial(s.sample, x), torch.device("cuda")) for _ in range(n)]
    ms = statistics.median(times) * 1e3
    return dict(
        backend=backend,
        batch=batch,
        steps=steps,
        channels_last=channels_last,
        precision=precision,
        ms_per_chain=ms,
        us_per_step=ms * 1e3 / steps,
        sample_steps_per_s=batch * steps / (ms / 1e3),
        first_call_s=first_s,
    )


def _device_time_us(evt) -> float:
    """Duration of a device-side profiler record (``device_time_total``; ``cuda_time_total`` before torch 2.4)."""
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(type(evt), name):
            return float(getattr(evt, name))
    return float(evt.time_range.elapsed_us())


def kernel_profile(model, batch, steps, backend, channels_last=None) -> dict:
    """Kernels of one warm chain: count (per chain and per step), summed device time, and the top kernels by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = uniform((batch, *model.input_shape), torch.device("cuda"), 7)
    s = LangevinSampler(model, steps=steps, backend=backend, seed=0, check_finite=False, channels_last=channels_last)
    s.sample(x)
    s.sample(x)
    torch.cuda.synchronize()
    chain_ms = time_call(lambda: s.sample(x), torch.device("cuda")) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s.sample(x)
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():  # device-side records: kernels, memcpy and memset
        if evt.device_type == DeviceType.CUDA:
            per_name[evt.name][0] += 1
            per_name[evt.name][1] += _device_time_us(evt)
    kernels = sum(c for c, _ in per_name.values())
    busy_us = sum(t for _, t in per_name.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    return dict(
        backend=backend,
        batch=batch,
        steps=steps,
        channels_last=channels_last,
        chain_ms=chain_ms,
        kernels=kernels,
        kernels_per_step=kernels / steps,
        busy_us_per_step=busy_us / steps,
        chain_us_per_step=chain_ms * 1e3 / steps,
        top=[dict(name=n[:90], count=c, us_total=t, us_per_step=t / steps) for n, (c, t) in top],
    )


def _print_variant(r: dict) -> None:
    head = f"{r['backend']:>10} {r['batch']:>6} {r['steps']:>5} {str(r.get('channels_last')):>9} {r['precision']:>5}"
    if "error" in r or "skipped" in r:
        print(f"{head} {'FAILED: ' + r['error'][:200] if 'error' in r else 'skipped: ' + r['skipped']}")
        return
    print(
        f"{head} {r['ms_per_chain']:>9.2f} {r['us_per_step']:>8.1f} {r['sample_steps_per_s']:>15,.0f} "
        f"{r['first_call_s']:>8.1f}"
    )


def _print_profile(p: dict) -> None:
    print(
        f"\nprofile: {p['backend']}, channels_last={p['channels_last']}, batch {p['batch']}, {p['steps']} steps: "
        f"{p['kernels']} kernels per chain ({p['kernels_per_step']:.2f}/step), GPU busy {p['busy_us_per_step']:.1f} "
        f"us/step of {p['chain_us_per_step']:.1f} us/step (events, unprofiled)"
    )
    for k in p["top"]:
        print(f"  {k['us_per_step']:8.2f} us/step  x{k['count'] / p['steps']:5.2f}/step  {k['name']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 16384])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no measurement after this many seconds (the rest is recorded as skipped)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device; torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if any(n < 1 for n in args.batches) or args.steps < 1 or args.reps < 1:
        print(f"--batches, --steps and --reps must be positive, got {args.batches}, {args.steps}, {args.reps}")
        return 2
    torch.manual_seed(0)
    model = CNNModel().cuda()
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "chain_variants": [], "profiles": []}

    def save():  # after every measurement, so a run stopped by its time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    t_start = time.perf_counter()
    print(
        f"{'backend':>10} {'batch':>6} {'steps':>5} {'chan.last':>9} {'prec':>5} {'ms/chain':>9} {'us/step':>8} "
        f"{'sample-steps/s':>15} {'first s':>8}"
    )
    for item in plan(args.batches):
        kind, backend, batch, channels_last = item[:4]
        over = args.time_budget_s is not None and time.perf_counter() - t_start > args.time_budget_s
        if kind == "variant":
            precision = item[4]
            base = dict(backend=backend, batch=batch, steps=args.steps, channels_last=channels_last)
            base["precision"] = precision
            if over:
                row = base | {"skipped": f"time budget {args.time_budget_s:g} s spent"}
            else:
                try:
                    row = chain_variant(model, batch, args.steps, args.reps, backend, channels_last, precision)
                except Exception as exc:  # a variant that fails is recorded, the others still run
                    row = base | {"error": f"{type(exc).__name__}: {exc}"}
            doc["chain_variants"].append(row)
            _print_variant(row)
        else:
            if over:
                print(f"profile of {backend} (channels_last={channels_last}) skipped: time budget spent")
                continue
            try:
                p = kernel_profile(model, batch, args.steps, backend, channels_last)
            except Exception as exc:  # the profiler is a diagnostic; report and go on
                print(f"profile of {backend} failed: {type(exc).__name__}: {exc}")
                continue
            doc["profiles"].append(p)
            _print_profile(p)
        save()
        torch.cuda.empty_cache()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
