"""backend="auto" on CPU for a model ebmfast does not recognise: the seed CNN's layers with a data-dependent branch
(a per-batch choice of activation made in Python on a tensor's value), so neither the chain program nor the kernel
backends run it and the compiled gradient is ``torch.func``'s (``sampler.explain(x)`` says so).

Run: python examples/branch_model.py [--batch 128] [--steps 60] [--rounds 5]
Times: ms per Langevin step, median of interleaved rounds (order rotated each round) after a warm-up; the warm-up
(compile, and auto's one timing of compiled against eager) is reported separately.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import ebmfast
from ebmfast.benchmark.timing import rotations


class BranchCNN(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, c // 2, 5, 2, 4),
                nn.Conv2d(c // 2, c, 3, 2, 1),
                nn.Conv2d(c, 2 * c, 3, 2, 1),
                nn.Conv2d(2 * c, 2 * c, 3, 2, 1),
            ]
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * c, 2 * c), nn.SiLU(), nn.Linear(2 * c, 1))

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
            x = nn.functional.silu(x) if x.mean() > 0 else torch.tanh(x)  # data-dependent: not recognised
        return self.head(x).squeeze(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = BranchCNN()
    x = torch.rand(args.batch, 1, 28, 28) * 2 - 1
    samplers = {b: ebmfast.LangevinSampler(model, steps=args.steps, backend=b, seed=0) for b in ("eager", "auto")}
    for name, s in samplers.items():
        t0 = time.perf_counter()
        s.sample(x)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
        print("  " + s.explain(x))
    names, times = list(samplers), {name: [] for name in samplers}
    for order in rotations(names, args.rounds):  # interleaved, the order rotated every round
        for name in order:
            t0 = time.perf_counter()
            samplers[name].sample(x)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:8s} {1e3 * t / args.steps:7.2f} ms/step   {med['eager'] / t:5.2f}x eager")


if __name__ == "__main__":
    main()
