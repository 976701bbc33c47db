"""``ebmfast sample --checkpoint C --n 64 --steps 256 --out grid.png``: samples from a trained checkpoint as a PNG
grid.

Chains start from U(-1, 1) noise (the seed's generation from scratch) and use the sampler settings stored in the
checkpoint's config (step size, noise, gradient clip); ``--steps`` sets the chain length (256 in the seed). The work
is ``ebmfast.evaluation.generate.generate``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import UsageError, require
from ..evaluation.generate import generate
from ..images import grid_image, save_image
from ..reference import energy_scores
from ..sampler import BACKENDS, resolve_backend
from ..training.checkpoint import load_model
from .outputs import output_file

__all__ = ["add_arguments", "run", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="C",
        help="checkpoint written by 'ebmfast train' (e.g. runs/quick/checkpoints/best.pt)",
    )
    parser.add_argument("--n", type=int, default=64, help="number of samples (chains) (default 64)")
    parser.add_argument("--steps", type=int, default=256, help="Langevin steps per chain (default 256, the seed's)")
    parser.add_argument(
        "--out",
        default="samples.png",
        metavar="FILE",
        help="image file for the grid, .png or .jpg (default samples.png)",
    )
    parser.add_argument(
        "--nrow", type=int, default=None, help="images per grid row (default: about the square root of --n)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise and the Langevin noise")
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="Langevin backend (default auto: graph on CUDA, compiled on CPU; eager skips the "
        "torch.compile start-up cost, which is worth it on CPU for a few hundred chains)",
    )


def run(args: argparse.Namespace) -> int:
    for name, lo, hi, why in (
        ("n", 1, 100_000, "chains held in memory at once, all drawn into one picture"),
        ("steps", 1, 1_000_000, "the seed uses 256; more is a typo or a chain that never ends"),
        ("seed", 0, 2**62, "stored as a 64-bit integer"),
    ):
        v = getattr(args, name)
        if not lo <= v <= hi:
            raise UsageError(f"--{name} must be in [{lo}, {hi:,}] ({why}), got {v}")
    if args.nrow is not None and args.nrow < 1:
        raise UsageError(f"--nrow must be >= 1, got {args.nrow}")
    out = output_file(args.out, "--out", IMAGE_SUFFIXES)
    require("PIL.Image", "ebmfast sample's picture", package="pillow")
    try:
        device = resolve_device(args.device)
        resolve_backend(args.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    model, config = load_model(args.checkpoint, map_location=device)  # CheckpointError -> exit 2

    t0 = time.perf_counter()
    samples = generate(
        model, n=args.n, steps=args.steps, seed=args.seed, backend=args.backend, config=config, device=device
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        scores = energy_scores(model, samples).float()
    nrow = args.nrow or max(1, math.ceil(math.sqrt(args.n)))
    picture = grid_image(
        samples,
        nrow,
        title=f"{args.n} samples from {Path(args.checkpoint).name}",
        caption=f"{args.steps} Langevin steps from U(-1, 1) noise each, seed {args.seed}; mean f(x) "
        f"{float(scores.mean()):.3f}",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(picture, out)
    print(
        f"ebmfast sample: wrote {out}: {args.n} samples, {args.steps} steps each, backend "
        f"{args.backend} on {device}, {seconds:.1f} s; mean f(x) of the samples {float(scores.mean()):.3f}"
    )
    return 0
