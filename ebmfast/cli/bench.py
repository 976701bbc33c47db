"""``ebmfast bench``: sampler and training throughput per backend, as tables, JSON and a long-format CSV history.

The measurement is ``ebmfast.benchmark`` (``throughput.py``, ``training.py``, ``report.py``); judging it against the
project's targets is the GPU check's job (``bench/device_summary.py``). ``python -m ebmfast.cli.bench`` is the same
command without building the other subcommands.

``torchrun --nproc-per-node N -m ebmfast bench --distributed``: every rank runs the sampler's chains on its own device
(cuda:LOCAL_RANK, or the CPU) in lockstep; rank 0 prints the aggregate sample-steps/s and each rank's figure
(``throughput.bench_sampler_distributed``). The training measurement is not part of this mode.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from ..autotune import architecture_key
from ..benchmark.flops import flops_per_sample_step
from ..benchmark.report import (
    check_csv_history,
    csv_rows,
    environment,
    fmt,
    format_distributed_table,
    format_table,
    format_train_table,
    write_csv_history,
)
from ..benchmark.throughput import (
    available_backends,
    bench_sampler,
    bench_sampler_distributed,
)
from ..benchmark.timing import measure_matmul_peak
from ..benchmark.training import SEED_EPOCHS, SEED_ITERS_PER_EPOCH, bench_train
from ..devices import resolve_device
from ..errors import UsageError
from ..models import CNNModel
from ..sampler import PRECISION_MODES
from .outputs import output_file

__all__ = ["GPU_BATCHES", "CPU_BATCHES", "DEFAULT_STEPS", "add_arguments", "run", "main"]

GPU_BATCHES = (1, 128, 1024, 16384)
CPU_BATCHES = (1, 128)
DEFAULT_STEPS = (60, 256)


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
        choices=PRECISION_MODES,
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
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun (torchrun --nproc-per-node N -m ebmfast bench --distributed): every rank runs the "
        "chains on its own device (cuda:LOCAL_RANK or the CPU) at the same time; rank 0 prints the aggregate "
        "sample-steps/s and each rank's. Sampler only (no training table, no --csv); --batch is per rank",
    )


def _bounded(flag: str, value: int, hi: int, why: str) -> None:
    """Upper bounds of the size flags: a typo must not start a measurement that cannot end or fit in memory."""
    if value > hi:
        raise UsageError(f"{flag} must be <= {hi:,} ({why}), got {value:,}")


@dataclass
class _Plan:
    """What a run measures, from the flags (checked)."""

    device: torch.device
    backends: list[str]
    unusable: dict[str, str]
    batches: list[int]
    steps: list[int]
    rounds: int
    iters: int


def run(args) -> int:
    plan = _plan(args)
    _check_flags(args)
    _check_outputs(args)  # the output files, before any measurement
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    compile_kwargs = {"dynamic": False} if args.compile_static else None
    if getattr(args, "distributed", False):
        if args.csv:
            raise UsageError("--csv is not supported with --distributed (use --json)")
        return _run_distributed(args, plan.backends, plan.batches, plan.steps, plan.rounds, compile_kwargs)
    torch.manual_seed(args.seed)
    model = CNNModel(hidden_features=args.hidden_features).to(plan.device)
    env, peak, fpss = _announce(args, plan, model)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")} | {
        "device": str(plan.device),
        "backends": plan.backends,
        "batch": plan.batches,
        "steps": plan.steps,
        "rounds": plan.rounds,
        "train_iters": plan.iters,
    }

    def document(sampler_results, train_results, complete):
        return {
            "complete": complete,  # False: written after the sampler part, training still to come
            "environment": env,
            "config": config,
            "matmul_peak": peak,
            "flop_per_sample_step": fpss,
            # what backend="auto"'s committed table is keyed by (bench/device_summary.py writes rows from this run)
            "model": {
                "architecture": architecture_key(model),
                "sample_shape": list(model.input_shape),
                "precision": args.precision,
            },
            "sampler": [asdict(r) for r in sampler_results],
            "train": [asdict(r) for r in train_results],
        }

    # what the sampler and the training measurements share
    common = dict(
        precision=args.precision,
        seed=args.seed,
        telemetry=args.telemetry,
        progress=args.progress,
        compile_kwargs=compile_kwargs,
    )
    sampler_results = bench_sampler(
        model,
        plan.device,
        plan.backends,
        plan.batches,
        plan.steps,
        rounds=plan.rounds,
        peak=peak,
        max_call_s=args.max_call_s,
        time_budget_s=args.time_budget_s,
        **common,
    )
    # Written now as well, so a run killed during training (e.g. by a stage timeout) keeps its sampler figures.
    _write_json(args.json, document(sampler_results, [], complete=not args.train))
    train_results = []
    if args.train:
        train_results = bench_train(
            model,
            plan.device,
            plan.backends,
            batch=args.train_batch,
            steps=args.train_steps,
            iters=plan.iters,
            **common,
        )
    env["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    _print_tables(args, plan, env, sampler_results, train_results)
    doc = document(sampler_results, train_results, complete=True)
    if args.json:
        _write_json(args.json, doc)
        print(f"\nwrote {args.json}")
    if args.csv:
        write_csv_history(args.csv, csv_rows(env, sampler_results, train_results, args.precision))
        print(f"appended to {args.csv}")
    failed = [r for r in sampler_results + train_results if (r.skipped or "").startswith("failed")]
    if failed:
        print(f"ebmfast bench: {len(failed)} measurement(s) failed (tracebacks above)", file=sys.stderr)
        return 1
    return 0


def _plan(args) -> _Plan:
    """The device, backends, batch sizes, chain lengths, rounds and training iterations to measure (checked)."""
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cuda = device.type == "cuda"
    try:
        backends, unusable = available_backends(device, args.backends)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.backends and unusable:
        name, why = next(iter(unusable.items()))
        raise UsageError(f"backend {name!r} is not available on {device}: {why}")
    if "eager" not in backends:
        backends.insert(0, "eager")  # the reference every ratio is taken against
    batches = args.batch or list(GPU_BATCHES if cuda else CPU_BATCHES)
    steps_list = args.steps or list(DEFAULT_STEPS)
    for name, values in (("--batch", batches), ("--steps", steps_list)):
        if any(v <= 0 for v in values):
            raise UsageError(f"{name} values must be positive integers, got {values}")
    _bounded("--batch", max(batches), 1 << 20, "images held on the device at once")
    _bounded("--steps", max(steps_list), 1_000_000, "a bound against typos that would never finish")
    rounds = args.rounds if args.rounds is not None else (10 if cuda else 5)
    iters = args.train_iters if args.train_iters is not None else (20 if cuda else 5)
    if rounds < 1 or iters < 1:
        raise UsageError(f"--rounds and --train-iters must be >= 1, got {rounds} and {iters}")
    _bounded("--rounds", rounds, 10_000, "a bound against typos that would never finish")
    _bounded("--train-iters", iters, 100_000, "a bound against typos that would never finish")
    return _Plan(device, backends, unusable, batches, steps_list, rounds, iters)


def _check_flags(args) -> None:
    """The training, model and timing flags: in range, or one line saying what was expected."""
    _bounded("--train-batch", args.train_batch, 1 << 20, "images held on the device at once")
    _bounded("--train-steps", args.train_steps, 1_000_000, "a bound against typos that would never finish")
    _bounded("--hidden-features", args.hidden_features, 4096, "the CNN's width")
    for flag, value, ok, wanted in (
        ("--train-batch", args.train_batch, args.train_batch >= 1, "a positive integer"),
        ("--train-steps", args.train_steps, args.train_steps >= 1, "a positive integer"),
        (
            "--hidden-features",
            args.hidden_features,
            args.hidden_features >= 2 and args.hidden_features % 2 == 0,
            "an even integer >= 2",
        ),
        ("--peak-n", args.peak_n, args.peak_n is None or 1 <= args.peak_n <= 1 << 16, "an integer in [1, 65536]"),
        ("--max-call-s", args.max_call_s, args.max_call_s is None or args.max_call_s > 0, "> 0"),
        ("--time-budget-s", args.time_budget_s, args.time_budget_s is None or args.time_budget_s >= 0, ">= 0"),
        ("--threads", args.threads, args.threads is None or 1 <= args.threads <= 1024, "an integer in [1, 1024]"),
        ("--seed", args.seed, args.seed >= 0, "a non-negative integer"),
    ):
        if not ok:
            raise UsageError(f"{flag} must be {wanted}, got {value}")


def _check_outputs(args) -> None:
    if args.json:
        output_file(args.json, "--json")
    if args.csv:
        csv_path = output_file(args.csv, "--csv")
        try:
            check_csv_history(csv_path)
        except ValueError as exc:  # a CSV with other columns: refused now, not after the measurements
            raise UsageError(f"--csv {exc}") from None


def _announce(args, plan: _Plan, model: CNNModel) -> tuple[dict, dict | None, float]:
    """Print what is measured where; returns the environment, the measured matmul peak (``--peak``) and the FLOP
    count of one sample-step."""
    env = environment(plan.device)
    unusable = plan.unusable
    print(
        f"ebmfast bench on {env['device_name']} ({plan.device}); torch {env['torch']}, triton {env['triton']}; "
        f"backends {', '.join(plan.backends)}" + (f"; unavailable: {', '.join(unusable)}" if unusable else ""),
        flush=True,
    )
    if plan.device.type != "cuda":
        print(
            f"cpu: {env['cpu_count']} cores, {env['torch_threads']} torch threads, load average (1 min) "
            f"{fmt(env['loadavg_1m'], '.2f')} at start",
            flush=True,
        )
    peak = None
    if args.peak:
        peak = measure_matmul_peak(plan.device, n=args.peak_n)
        tf32 = f", tf32 {peak['tf32_tflops']:.2f}" if peak["tf32_tflops"] else ""
        print(f"measured matmul peak (n={peak['n']}): fp32 {peak['fp32_tflops']:.3f} TFLOP/s{tf32}", flush=True)
    fpss = flops_per_sample_step(model, model.input_shape)
    print(f"work per sample-step (forward + input gradient): {fpss / 1e6:.3f} MFLOP", flush=True)
    return env, peak, fpss


def _write_json(path: str | None, doc: dict) -> None:
    """``--json``, replaced atomically (nothing without the flag)."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2, default=str)
        os.replace(tmp, path)


def _print_tables(args, plan: _Plan, env: dict, sampler_results: list, train_results: list) -> None:
    print()
    if plan.device.type != "cuda":
        print(f"load average (1 min) at end {fmt(env['loadavg_1m_end'], '.2f')}")
    print(f"Sampler ({args.precision}, {plan.rounds} interleaved rounds, median; {sampler_results[0].timer})")
    print(format_table(sampler_results))
    if train_results:
        print()
        print(
            f"Contrastive-divergence training (batch {args.train_batch}, {args.train_steps} steps, {plan.iters} "
            f"iterations, median); 60 ep = projected {SEED_EPOCHS} x {SEED_ITERS_PER_EPOCH} iterations"
        )
        print(format_train_table(train_results))


def _run_distributed(args, backends, batches, steps_list, rounds, compile_kwargs) -> int:
    """``--distributed``: join torchrun's process group (if any), measure in lockstep, report on rank 0."""
    from ..training.distributed import describe_failure, init_distributed, shutdown_distributed

    try:
        ctx, device = init_distributed(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot join the torchrun process group: {exc}") from None
    ok = False
    try:
        torch.manual_seed(args.seed)
        model = CNNModel(hidden_features=args.hidden_features).to(device)
        if ctx.is_main:
            env = environment(device)
            launched = f"{ctx.world_size} rank(s) ({ctx.backend})" if ctx.distributed else "1 rank (not under torchrun)"
            print(
                f"ebmfast bench --distributed: {launched}, rank 0 on {env['device_name']} ({device}); torch "
                f"{env['torch']}; backends {', '.join(backends)}; {torch.get_num_threads()} torch thread(s) per rank",
                flush=True,
            )
            if args.train:
                print("(the training measurement is not part of --distributed)", flush=True)
        results = bench_sampler_distributed(
            model,
            device,
            ctx,
            backends,
            batches,
            steps_list,
            rounds=rounds,
            precision=args.precision,
            seed=args.seed,
            progress=args.progress,
            compile_kwargs=compile_kwargs,
        )
        ok = True
    except Exception as exc:
        message = describe_failure(exc, ctx)
        if message is None:
            raise
        print(f"ebmfast bench: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed(ctx, wait=ok)
    if results is None:  # not rank 0
        return 0
    print()
    print(
        f"Sampler across {ctx.world_size} rank(s) ({args.precision}, {rounds} rounds in lockstep, median; per-rank "
        "figures are each rank's own median)"
    )
    print(format_distributed_table(results))
    if args.json:
        doc = {"complete": True, "config": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
        doc["distributed"] = [asdict(r) for r in results]
        _write_json(args.json, doc)
        print(f"\nwrote {args.json}")
    failed = [r for r in results if (r.skipped or "").startswith("failed")]
    if failed:
        print(f"ebmfast bench: {len(failed)} measurement(s) failed", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ebmfast.cli.bench``: the same as ``ebmfast bench``, without loading the other subcommands."""
    from . import Parser, run_parsed

    parser = Parser(prog="python -m ebmfast.cli.bench", description="measure sampler throughput")
    add_arguments(parser)
    parser.set_defaults(_module=sys.modules[__name__], command="bench")
    return run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    from ..training.distributed import exit_process

    exit_process(main())
