"""``ebmfast evaluate``: the command line of ``ebmfast.evaluation.report.evaluate_model``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..data import DATASETS, load_dataset
from ..devices import resolve_device
from ..errors import UsageError, require
from ..evaluation.quality import CLASSIFIER_FILENAME, ClassifierConfig, check_classifier_cache
from ..evaluation.report import check_n_samples, checkpoint_provenance, evaluate_model
from ..sampler import BACKENDS, resolve_backend
from ..training.checkpoint import load_model
from ..training.config import config_value
from .outputs import output_dir

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint written by 'ebmfast train'")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="report folder (default: eval_<checkpoint name> next to the checkpoint)",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'"
    )
    parser.add_argument(
        "--n-samples",
        type=int,
        default=256,
        metavar="N",
        help="chains generated from noise for the sample-quality numbers (default 256)",
    )
    parser.add_argument(
        "--steps", type=int, default=256, metavar="K", help="Langevin steps per chain from noise (default 256)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of chain starts, sampler noise and data subsets"
    )
    parser.add_argument(
        "--n-ood",
        type=int,
        default=1000,
        metavar="N",
        help="images per out-of-distribution set (capped by the test split; default 1000)",
    )
    parser.add_argument(
        "--fashion-root",
        metavar="DIR",
        default=None,
        help="folder with Fashion-MNIST's t10k-images-idx3-ubyte[.gz] (default: search the usual "
        "places, e.g. Debian's dataset-fashion-mnist); skipped with a note when absent",
    )
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default=None,
        help="evaluation digits (default: the data set the checkpoint was trained on, else mnist5k)",
    )
    parser.add_argument("--data-root", metavar="DIR", default=None, help="torchvision MNIST root for --data mnist")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="sampler backend (default: 'auto' on CUDA; 'eager' on CPU, where compiling costs more "
        "than it saves for one evaluation)",
    )
    parser.add_argument(
        "--classifier",
        metavar="PATH",
        default=None,
        help=f"classifier cache (default: {CLASSIFIER_FILENAME} next to the checkpoint)",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        default=ClassifierConfig.epochs,
        metavar="E",
        help=f"epochs when the classifier has to be trained (default {ClassifierConfig.epochs})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


# (flag, upper bound, why): a typo must not start an evaluation that never ends
_BOUNDS = (
    ("n_samples", 1_000_000, "chains held in memory at once"),
    ("steps", 1_000_000, "the seed uses 256; more is a typo or an evaluation that never ends"),
    ("n_ood", 1_000_000, "images per out-of-distribution set; the test splits hold far fewer"),
    ("classifier_epochs", 1000, "the default is a few; more is a typo"),
)


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[evaluate {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    log = _Log(args.quiet)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise UsageError(f"--checkpoint: no file at {str(ckpt)!r}")
    for name, hi, why in _BOUNDS:
        v = getattr(args, name)
        if not 1 <= v <= hi:
            raise UsageError(f"--{name.replace('_', '-')} must be in [1, {hi:,}] ({why}), got {v}")
    if args.n_samples < 2:
        raise UsageError(f"--n-samples must be >= 2 (the Fréchet distance needs a covariance), got {args.n_samples}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    try:
        device = resolve_device(args.device)
        if args.backend is not None:
            resolve_backend(args.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    out = output_dir(args.out if args.out else ckpt.parent / f"eval_{ckpt.stem}", "--out")
    clf_path = check_classifier_cache(
        (Path(args.classifier) if args.classifier else ckpt.parent / CLASSIFIER_FILENAME).resolve()
    )  # a file that is not a classifier cache (the checkpoint itself, say) is refused, never overwritten
    require("matplotlib.figure", "the evaluate report's charts", package="matplotlib")
    require("PIL.Image", "the evaluate report's sample pictures", package="pillow")
    model, config = load_model(str(ckpt), map_location=device)  # CheckpointError is a UsageError: exit 2
    info, buffer_images = checkpoint_provenance(ckpt)
    config = dict(config or {})
    data_name = args.data or config_value(config, "data", "mnist5k")
    if data_name not in DATASETS:
        raise UsageError(f"the checkpoint's data set {data_name!r} is not one of {list(DATASETS)}; pass --data")
    data = load_dataset(data_name, args.data_root or config_value(config, "data_root"))
    problem = check_n_samples(args.n_samples, data)
    if problem:
        raise UsageError(f"--n-samples: {problem}")
    log(f"loaded {ckpt} and {data.name}; writing the report to {out}")
    evaluate_model(
        model,
        config,
        out,
        data=data,
        device=device,
        n_samples=args.n_samples,
        steps=args.steps,
        seed=args.seed,
        n_ood=args.n_ood,
        fashion_root=args.fashion_root,
        backend=args.backend,
        classifier_path=clf_path,
        classifier_config=ClassifierConfig(epochs=args.classifier_epochs),
        checkpoint_info=info,
        log=log,
        progress=not args.quiet,
        buffer_images=buffer_images,
    )
    print(out / "report.md")
    return 0
