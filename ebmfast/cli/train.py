"""``ebmfast train``: the command line of ``ebmfast.training.Trainer``.

Every value is checked before a file is written; a bad one is a ``UsageError`` (one line, exit 2). Training that keeps
diverging exits 1; SIGINT/SIGTERM save a resumable checkpoint and exit 128 + the signal number.

Started by ``torchrun`` (its RANK / WORLD_SIZE / LOCAL_RANK variables are set), every process joins the process
group and trains data-parallel (``ebmfast.training.distributed``); a lost rank ends each surviving one with a
one-line message and exit 1 (torchrun then stops the job).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from ..data import DATASETS, load_dataset
from ..devices import resolve_device
from ..errors import CheckpointError, DivergenceError, UsageError
from ..sampler import BACKENDS, PRECISION_MODES, resolve_backend
from ..training.checkpoint import load_checkpoint
from ..training.config import PRESETS, TrainConfig
from ..training.distributed import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    describe_failure,
    init_distributed,
    launch_env,
    rank_device,
    shutdown_distributed,
)
from ..training.trainer import Trainer
from .outputs import output_dir

__all__ = ["add_arguments", "build_config", "run"]


def _run_dir_of(checkpoint: Path) -> Path:
    """DIR for DIR/checkpoints/NAME.pt, else the checkpoint's folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


# (flag, config field, type, help); every flag defaults to None = "not given", so the preset (or the resumed run's
# config) decides.
_OVERRIDES = [
    ("--epochs", "epochs", int, "number of epochs (tutorial: 60)"),
    ("--max-iterations", "max_iterations", int, "stop after this many training iterations in total"),
    ("--seed", "seed", int, "random seed (tutorial: 42)"),
    (
        "--batch-size",
        "batch_size",
        int,
        "images per iteration in total; under torchrun each of the N ranks takes batch-size/N of them, so the "
        "recipe does not change with N (tutorial: 128)",
    ),
    ("--lr", "lr", float, "Adam learning rate (tutorial: 1e-4)"),
    ("--alpha", "alpha", float, "weight of the energy regulariser alpha (tutorial: 0.1)"),
    ("--hidden", "hidden_features", int, "CNNModel hidden_features (tutorial: 32)"),
    ("--sampler-steps", "sampler_steps", int, "Langevin steps per training iteration (tutorial: 60)"),
    (
        "--buffer-size",
        "buffer_size",
        int,
        "replay-buffer capacity in total; under torchrun each rank holds a shard of buffer-size/N (tutorial: 8192)",
    ),
    ("--sample-every", "sample_every", int, "write sample grids every N epochs, 0 = never (tutorial: 5)"),
    ("--gen-steps", "gen_steps", int, "Langevin steps of the generation grid's chains (tutorial: 256)"),
    ("--max-recoveries", "max_recoveries", int, "divergence roll-backs allowed before giving up (default 3)"),
    (
        "--sync-every",
        "sync_every",
        int,
        "copy step metrics to the host (log, progress, divergence checks) every N iterations (default 1 on CPU, "
        "10 on CUDA)",
    ),
]


EPILOG = (
    "Several processes (data-parallel, DistributedDataParallel): torchrun --standalone --nproc-per-node N -m ebmfast "
    "train ... One process per GPU (rank r on cuda:LOCAL_RANK, NCCL), or per CPU share (gloo). --batch-size and "
    "--buffer-size are totals split evenly over the N ranks (the batch size must be divisible by N); every rank has "
    "its own sampler and replay-buffer seeds (derived from --seed and the rank); the gradients are averaged across "
    "ranks before the gradient-norm clip; the step metrics are averaged across ranks; only rank 0 writes --out. "
    "Several machines: on each, torchrun --nnodes M --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
    "--rdzv-id RUN -m ebmfast train ... A checkpoint resumes on any number of ranks: bit-identically (on CPU) with "
    "the number that wrote it, re-sharding the replay buffer otherwise. A rank that dies or hangs ends the job within "
    "--dist-timeout seconds; SIGINT/SIGTERM to torchrun save a resumable checkpoint first."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="named configuration: 'tutorial' = the seed's (default), 'quick' = <= 10 min on a "
        "2-core CPU (ignored with --resume: the run's own config is used)",
    )
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default=None,
        help="training data: the embedded 5,000-image MNIST subset (default, no network) or full "
        "MNIST through torchvision",
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="folder holding torchvision's MNIST (for --data mnist; default $EBMFAST_DATA or ./data)",
    )
    parser.add_argument("--download", action="store_true", help="download full MNIST into --data-root if missing")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default runs/PRESET; with --resume, the resumed run's folder)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    for flag, name, kind, help_text in _OVERRIDES:
        parser.add_argument(
            flag, dest=name, type=kind, default=None, metavar="N" if kind is int else "X", help=help_text
        )
    parser.add_argument(
        "--sampler-backend",
        dest="sampler_backend",
        default=None,
        choices=BACKENDS,
        help="Langevin backend (default auto: graph on CUDA, compiled on CPU)",
    )
    parser.add_argument(
        "--precision",
        dest="sampler_precision",
        default=None,
        choices=PRECISION_MODES,
        help="sampler arithmetic (default fp32, the seed's)",
    )
    parser.add_argument(
        "--set",
        dest="set_values",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any TrainConfig field, e.g. --set gen_chains=4 (repeatable; fields: "
        + ", ".join(TrainConfig.field_names())
        + ")",
    )
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    parser.add_argument(
        "--no-divergence-check", action="store_true", help="turn off divergence detection and roll-back"
    )
    parser.add_argument(
        "--no-iteration-graph",
        action="store_true",
        help="on CUDA, run each iteration uncaptured instead of replaying it as one CUDA graph",
    )
    parser.add_argument(
        "--quality-every",
        type=int,
        default=0,
        metavar="N",
        help="sample-quality metrics (ebmfast.evaluation.quality.QualityCallback) every N epochs; 0 = off",
    )
    parser.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue the run saved in CKPT (e.g. DIR/checkpoints/last.pt) exactly where it stopped",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow --out to be a folder holding an earlier run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core). On a CPU shared with "
        "other busy processes, 1 thread (or OMP_WAIT_POLICY=PASSIVE) avoids OpenMP spin-wait "
        "slow-downs of 5-30x measured on a 2-core machine",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="under torchrun: seconds a rank waits for the others (in one collective) before the job ends with an "
        f"error, so a dead or hung rank cannot hang the job (default {DEFAULT_TIMEOUT_S:g})",
    )


def build_config(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """The TrainConfig the command line asks for (``base``: the resumed run's config dict). Raises UsageError."""
    if base is None:
        base = dict(PRESETS[args.preset or "tutorial"])
    overrides = {name: getattr(args, name) for _, name, _, _ in _OVERRIDES if getattr(args, name, None) is not None}
    for name in ("sampler_backend", "sampler_precision", "data"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "no_tensorboard", False):
        overrides["tensorboard"] = False
    if getattr(args, "no_divergence_check", False):
        overrides["divergence_check"] = False
    if getattr(args, "no_iteration_graph", False):
        overrides["iteration_graph"] = False
    for item in getattr(args, "set_values", []):
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = TrainConfig.parse_value(key.strip(), text)
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
    try:
        return TrainConfig.from_dict({**base, **overrides})
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # ---- everything is checked before a file is written (and, under torchrun, before the ranks meet)
    try:
        launch = launch_env()  # (rank, world size, local rank) under torchrun, else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rank, world = (launch[0], launch[1]) if launch else (0, 1)
    ckpt_base = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)  # CheckpointError -> exit 2
        if ckpt.get("kind") != "train" or not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{args.resume} is not a resumable training checkpoint")
        ckpt_base = ckpt["config"]
        del ckpt
    config = build_config(args, ckpt_base)
    if isinstance(args.quality_every, bool) or args.quality_every < 0:
        raise UsageError(f"--quality-every must be >= 0, got {args.quality_every}")
    callbacks = []
    if args.quality_every > 0:
        try:
            from ..evaluation.quality import QualityCallback
        except ImportError as exc:
            raise UsageError(
                f"--quality-every needs ebmfast.evaluation.quality, which cannot be imported ({exc})"
            ) from None
        if rank == 0:  # its pictures, classifier cache and curves are rank 0's business
            callbacks.append(QualityCallback(every=args.quality_every))
    try:
        device = rank_device(args.device, launch[2], world) if launch else resolve_device(args.device)
        resolve_backend(config.sampler_backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    if config.batch_size % world:
        raise UsageError(
            f"--batch-size {config.batch_size} must be divisible by the {world} ranks: it is the total per iteration "
            "and each rank takes an equal share"
        )
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= 1024:
        raise UsageError(f"--threads must be in [1, 1024], got {threads}")
    if args.out is not None:
        out = Path(args.out)
    elif args.resume:
        out = _run_dir_of(Path(args.resume))
    else:
        out = Path("runs") / (args.preset or "tutorial")
    output_dir(out, "--out")
    if callbacks:  # the quality callback's classifier cache goes next to the checkpoints: refuse a foreign file now
        from ..evaluation.quality import CLASSIFIER_FILENAME, check_classifier_cache

        check_classifier_cache(out / "checkpoints" / CLASSIFIER_FILENAME)
    existing = out / "checkpoints" / "last.pt"
    if not args.resume and not args.overwrite and existing.exists():
        raise UsageError(
            f"{out} already holds a run; continue it with --resume {existing}, choose another --out, "
            "or pass --overwrite"
        )
    try:
        ctx, device = init_distributed(args.device, args.dist_timeout) if launch else (DistContext(), device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot join the torchrun process group: {exc}") from None
    ok = False  # set once every rank has got through; a failed run leaves the process group without waiting
    try:
        code = _train(args, config, ctx, device, out, callbacks, threads)
        ok = True
        return code
    except Exception as exc:
        message = describe_failure(exc, ctx)
        if message is None:
            raise
        last = out / "checkpoints" / "last.pt"
        print(
            f"ebmfast train: {message}. The job stops"
            + (f"; resume from {last} with the same torchrun command and --resume {last}" if last.exists() else ""),
            file=sys.stderr,
        )
        return 1
    finally:
        shutdown_distributed(ctx, wait=ok)


def _train(args, config: TrainConfig, ctx: DistContext, device, out: Path, callbacks, threads) -> int:
    if args.download and ctx.world_size > 1 and not ctx.is_main:
        ctx.barrier("waiting for rank 0 to download the data")  # one download, then every rank reads it
    data = load_dataset(config.data, root=args.data_root, download=args.download)  # DataNotFoundError -> exit 2
    if args.download and ctx.world_size > 1 and ctx.is_main:
        ctx.barrier("waiting for rank 0 to download the data")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        trainer = Trainer(
            config,
            data=data,
            device=device,
            out_dir=out,
            callbacks=callbacks,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, FileExistsError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise UsageError(str(exc)) from None
    say = print if ctx.is_main else (lambda *a, **k: None)
    ranks = f" x {ctx.world_size} ranks ({ctx.backend}, torchrun)" if ctx.distributed else ""
    say(
        f"ebmfast train: {config.epochs} epochs of {len(trainer.batches)} iterations on {device}{ranks} "
        f"(sampler backend {config.sampler_backend}, data {config.data}; {trainer.runner.describe()}); "
        f"writing to {out}"
    )
    try:
        result = trainer.fit()
    except DivergenceError as exc:
        if ctx.is_main:
            print(f"ebmfast train: training diverged: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    m = result.metrics
    summary = ", ".join(f"{k} {m[k]:.4g}" for k in ("val_contrastive_divergence", "val_real_out", "rand_out") if k in m)
    if result.status == "interrupted":  # the trainer has printed where the checkpoint is and how to resume
        if ctx.distributed:
            say(
                f"ebmfast train: all {ctx.world_size} ranks stopped at iteration {result.iteration}; resume with the "
                f"same torchrun command and --resume {result.last_checkpoint} (any number of ranks)"
            )
        return 128 + int(signal.Signals[result.signal])
    how = "finished" if result.status == "completed" else f"stopped at max_iterations={config.max_iterations}"
    say(
        f"ebmfast train: {how}: {result.epoch} epochs, {result.iteration} iterations, "
        f"{result.wall_time_s:.0f} s, {result.recoveries} divergence recoveries; {summary}"
    )
    t = result.timing
    if "first_iteration_s" in t and "iteration_ms" in t:
        say(
            f"ebmfast train: first iteration {t['first_iteration_s']:.1f} s (compilation, capture), then "
            f"{t['iteration_ms']:.1f} ms per iteration"
            + (f", {t['epoch_end_s']:.2f} s per epoch end" if "epoch_end_s" in t else "")
        )
    say(
        f"ebmfast train: checkpoints in {out / 'checkpoints'}, grids in {out / 'samples'}, metrics in "
        f"{out / 'metrics.csv'}"
    )
    return 0
