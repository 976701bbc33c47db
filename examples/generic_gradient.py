"""Where the energy gradient's time goes on CPU: eager autograd, the generic compiled gradient (``torch.func``, what
runs a model ``ebmfast.recognise`` does not read) and the chain program (``energy_grad.program_energy_grad``, what
runs a recognised one), on the seed CNN's layers.

Run: python examples/generic_gradient.py [--batch 128] [--rounds 7] [--reps 10] [--profile]
Times: ms per gradient, median of interleaved rounds (order rotated each round) after a warm-up; compile time is
reported separately. ``--profile``: the top aten kernels of each candidate (torch.profiler).
"""

import argparse
import statistics
import time
import weakref

import torch

import ebmfast
from ebmfast import energy_grad as eg
from ebmfast.benchmark.timing import rotations
from ebmfast.recognise import recognise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ebmfast.CNNModel().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = (torch.rand(args.batch, 1, 28, 28) * 2 - 1).contiguous(memory_format=torch.channels_last)
    program = recognise(model, x)
    func_grad = torch.compile(eg._func_energy_grad(weakref.ref(model)))  # as before: convolution_backward
    func_grad_t = eg.compile_generic(eg._func_energy_grad(weakref.ref(model)), {})  # conv_input_grad decomposed
    chain = torch.compile(lambda t, x: eg.program_energy_grad(program, t, x))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    eager = eg.eager_energy_grad(model)
    runs = {
        "eager autograd": lambda: eager(x),
        "generic, plain torch.compile": lambda: func_grad(params, buffers, x),
        "generic, compile_generic": lambda: func_grad_t(params, buffers, x),
        "chain program": lambda: chain(program.read(model), x),
    }
    for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        print(f"warm-up (compile) {name}: {time.perf_counter() - t0:.1f} s")
    ref = runs["eager autograd"]()
    for name, run in runs.items():
        print(f"max |g - eager| {name}: {(run() - ref).abs().max().item():.2e}")
    names, times = list(runs), {name: [] for name in runs}
    for order in rotations(names, args.rounds):  # interleaved, the order rotated every round
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.reps):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / args.reps)
    for name in names:
        print(f"{name:32s} {1e3 * statistics.median(times[name]):7.2f} ms per gradient (batch {args.batch})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.reps):
                    runs[name]()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
