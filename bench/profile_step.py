"""Where the time of a Langevin step goes on a GPU (CUDA only; ``bench/device_check.sh`` runs it).

    python bench/profile_step.py [--batches 128 16384] [--steps 60] [--json FILE]

1. Captured-chain variants per batch size (one CUDA-graph replay per chain, CUDA events, median of ``--reps``):
   ``graph`` with the compiled gradient in NCHW / channels-last layout (``LangevinSampler(channels_last=...)``) in
   fp32 / tf32, and ``triton`` (our layer kernels) in fp32 / tf32 / bf16. The defaults are NCHW and fp32.
2. ``torch.profiler`` over one warm chain of the ``fused`` backend and one replay each of ``graph`` (NCHW and
   channels-last) and ``triton`` at the first batch size: kernels per step, GPU busy time per step against the
   chain's time per step (the rest is launch gaps), and the kernels that take the most time.
Measurements only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from functools import partial

import torch

from ebmfast import CNNModel, LangevinSampler
from ebmfast.benchmark.timing import time_call, uniform


def graph_variants(model, batches, steps, reps, kernel_backends=("triton",)):
    """The graph backend per batch size, precision (fp32 / tf32) and layout of the compiled gradient (NCHW /
    channels-last). cuDNN's algorithm search (``torch.backends.cudnn.benchmark``) is left as the user has it: on an
    H200 it changed nothing here (2026-11-30: 229.6 vs 231.6 us/step at batch 128, 8002.6 vs 8006.0 at 16384)."""
    rows = []
    for batch in batches:
        x = uniform((batch, *model.input_shape), torch.device("cuda"), batch)
        variants = [("graph", cl, p) for cl in (False, True) for p in ("fp32", "tf32")]
        variants += [(b, None, p) for b in kernel_backends for p in ("fp32", "tf32", "bf16")]
        for backend, channels_last, precision in variants:
            try:
                s = LangevinSampler(
                    model,
                    steps=steps,
                    backend=backend,
                    precision=precision,
                    seed=0,
                    check_finite=False,
                    channels_last=channels_last,
                )
                s.sample(x)  # warm-up + capture
                n = reps if batch < 4096 else max(3, reps // 2)
                times = [time_call(partial(s.sample, x), torch.device("cuda")) for _ in range(n)]
                ms = statistics.median(times) * 1e3
                row = dict(
                    backend=backend,
                    batch=batch,
                    steps=steps,
                    channels_last=channels_last,
                    precision=precision,
                    ms_per_chain=ms,
                    us_per_step=ms * 1e3 / steps,
                    sample_steps_per_s=batch * steps / (ms / 1e3),
                )
            except Exception as exc:  # a variant that fails is recorded, the others still run
                row = dict(
                    backend=backend, batch=batch, steps=steps, precision=precision, error=f"{type(exc).__name__}: {exc}"
                )
            rows.append(row)
            s = None
            torch.cuda.empty_cache()
    return rows


def _device_time_us(evt) -> float:
    """Duration of a device-side profiler record (``device_time_total``; ``cuda_time_total`` before torch 2.4)."""
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(type(evt), name):
            return float(getattr(evt, name))
    return float(evt.time_range.elapsed_us())


def kernel_profile(model, batch, steps, backend, channels_last=None):
    """Kernels of one warm chain: count, summed device time, and the top kernels by time."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 16384])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device; torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = CNNModel().cuda()
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():  # after every section, so a run stopped by its time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    doc["graph_variants"] = graph_variants(model, args.batches, args.steps, args.reps)
    save()
    print("captured-chain variants (median CUDA-event time per chain)")
    print(
        f"{'backend':>8} {'batch':>6} {'steps':>5} {'chan.last':>9} {'prec':>5} {'ms/chain':>9} {'us/step':>8} "
        f"{'sample-steps/s':>15}"
    )
    for r in doc["graph_variants"]:
        if "error" in r:
            print(f"{r['backend']:>8} {r['batch']:>6} {r['steps']:>5} {r['precision']:>5} FAILED: {r['error'][:200]}")
            continue
        print(
            f"{r['backend']:>8} {r['batch']:>6} {r['steps']:>5} {str(r['channels_last']):>9} {r['precision']:>5} "
            f"{r['ms_per_chain']:>9.2f} {r['us_per_step']:>8.1f} {r['sample_steps_per_s']:>15,.0f}"
        )
    doc["profiles"] = []
    for backend, channels_last in (("fused", None), ("graph", None), ("graph", True), ("triton", None)):
        try:
            p = kernel_profile(model, args.batches[0], args.steps, backend, channels_last)
        except Exception as exc:  # the profiler is a diagnostic; report and go on
            print(f"profile of {backend} failed: {type(exc).__name__}: {exc}")
            continue
        doc["profiles"].append(p)
        save()
        print(
            f"\nprofile: {backend}, channels_last={channels_last}, batch {p['batch']}, {p['steps']} steps: "
            f"{p['kernels_per_step']:.1f} kernels/step, "
            f"GPU busy {p['busy_us_per_step']:.1f} us/step of {p['chain_us_per_step']:.1f} us/step (events, unprofiled)"
        )
        for k in p["top"]:
            print(f"  {k['us_per_step']:8.2f} us/step  x{k['count'] / p['steps']:5.2f}/step  {k['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
