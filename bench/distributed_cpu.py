"""CPU data-parallel check: training images per second, 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2
threads, at the same total batch, alternated run by run so that a busy phase of a shared machine hits both alike.

Each run is ``ebmfast train --preset quick`` (batch 128 in total, 60 Langevin steps, the seed's CNN) for
``--iterations`` iterations with no pictures and no TensorBoard; the rate is taken from ``metrics.csv``'s wall
times between the ``--skip``-th and the last iteration (compilation and warm-up excluded):
images/s = batch x (iterations after the skipped ones) / (their wall time).

    python3 bench/distributed_cpu.py --pairs 3 --iterations 30 --skip 8 --backend compiled
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rate(metrics_csv: Path, batch: int, skip: int) -> float:
    times = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["metric"] == "loss":
                times[int(row["step"])] = float(row["wall_time"])
    steps = sorted(times)[skip:]
    return batch * (len(steps) - 1) / (times[steps[-1]] - times[steps[0]])


def run(kind: str, out: Path, args) -> float:
    train = [
        "-m",
        "ebmfast",
        "train",
        "--preset",
        "quick",
        "--out",
        str(out),
        "--max-iterations",
        str(args.iterations),
        "--sampler-backend",
        args.backend,
        "--batch-size",
        str(args.batch),
        "--sample-every",
        "0",
        "--no-tensorboard",
        "--quiet",
        "--device",
        "cpu",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    if kind == "2x1":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *train]
        cmd += ["--threads", "1"]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, *train, "--threads", "2"]
        env["OMP_NUM_THREADS"] = "2"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return rate(out / "metrics.csv", args.batch, args.skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--skip", type=int, default=8, help="first iterations left out (compile, warm-up)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--backend", default="compiled")
    args = p.parse_args()
    results = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for kind in ("1x2", "2x1") if i % 2 == 0 else ("2x1", "1x2"):
                load = os.getloadavg()[0]
                t0 = time.time()
                r = run(kind, Path(tmp) / f"{kind}-{i}", args)
                results[kind].append(r)
                print(f"pair {i} {kind}: {r:.1f} images/s ({time.time() - t0:.0f} s, load average {load:.2f} before)")
    print()
    print(f"backend {args.backend}, batch {args.batch} in total, {args.iterations} iterations, skip {args.skip}")
    for kind, label in (("1x2", "1 process x 2 threads"), ("2x1", "2 ranks x 1 thread (gloo)")):
        v = results[kind]
        print(f"{label:<28} median {statistics.median(v):.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in v)})")
    ratio = statistics.median(results["2x1"]) / statistics.median(results["1x2"])
    print(f"2 ranks / 1 process: {ratio:.2f}x")


if __name__ == "__main__":
    main()
