"""The figures of the ``ebmfast evaluate`` report.

Sample grids, drawn by ``ebmfast.images`` (each digit at 84 pixels, nearest-neighbour, with a title and labels):
``plot_generation_steps`` (the seed's figure: chains from noise at the shown steps), ``plot_samples`` (generated or
replay-buffer samples labelled by the classifier), ``plot_transform_examples`` (one test image, noisy, flipped,
shrunk). Charts, drawn with matplotlib (imported only then): ``plot_chain_energy`` (f(x) along the chains),
``plot_energy_histograms`` (test digits vs each out-of-distribution set, AUROC in the titles),
``plot_class_distribution``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import require
from ..images import grid_image, save_image
from .ood import SET_LABELS, add_gaussian_noise, auroc, batch_scores, flip, shrink

__all__ = [
    "plot_generation_steps",
    "plot_chain_energy",
    "plot_samples",
    "plot_class_distribution",
    "plot_energy_histograms",
    "plot_transform_examples",
]


def _figure(*args, **kwargs):
    figure = require("matplotlib.figure", "the evaluate report's figures", package="matplotlib")
    return figure.Figure(*args, **kwargs)


def plot_generation_steps(trajectory_images: torch.Tensor, steps_shown: list[int], path: Path) -> Path:
    """The seed's generation figure: rows are chains from U(-1, 1), columns their state at each shown step."""
    cols, rows = trajectory_images.shape[:2]  # (columns, chains, 1, 28, 28)
    picture = grid_image(
        trajectory_images.transpose(0, 1).reshape(-1, *trajectory_images.shape[2:]),
        cols,
        title=f"Generation from noise: {rows} chains",
        caption="rows: chains; columns: after the Langevin step shown above (0 = the U(-1, 1) start)",
        col_labels=[str(k) for k in steps_shown],
    )
    return save_image(picture, path)


def plot_chain_energy(scores: np.ndarray, ref_lines: dict[str, float], path: Path) -> None:
    """f(x) of each chain at every step (faint) and their mean, with reference levels of real data and noise."""
    fig = _figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(scores.shape[0])
    for c in range(scores.shape[1]):
        ax.plot(steps, scores[:, c], color="tab:gray", alpha=0.35, lw=0.8)
    ax.plot(steps, scores.mean(1), color="tab:blue", lw=2, label="mean over chains")
    colors = iter(["tab:green", "tab:red", "tab:orange"])
    for name, v in ref_lines.items():
        if v is not None and math.isfinite(v):
            ax.axhline(v, ls="--", lw=1, color=next(colors), label=name)
    ax.set_xlabel("Langevin step", fontsize=8)
    ax.set_ylabel("f(x) = -E(x)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title("Score along chains from noise", fontsize=9)
    fig.savefig(path, dpi=80)


def plot_samples(
    samples: torch.Tensor, probs: torch.Tensor | None, path: Path, cols: int = 8, title: str | None = None
) -> Path:
    """A grid of samples, each labelled with the classifier's digit and confidence when ``probs`` is given."""
    labels = None
    if probs is not None:
        conf, digit = probs.max(1)
        labels = [f"{int(k)} ({float(p):.2f})" for p, k in zip(conf, digit)]
    return save_image(grid_image(samples, cols, title=title, cell_labels=labels), path)


def plot_class_distribution(fractions: list[float], confidence: float, path: Path) -> None:
    fig = _figure(figsize=(4.5, 2.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(fractions)), fractions, color="tab:blue")
    ax.axhline(1.0 / len(fractions), ls="--", color="tab:gray", lw=1, label="uniform (real digits)")
    ax.set_xticks(range(len(fractions)))
    ax.set_xlabel("predicted digit", fontsize=8)
    ax.set_ylabel("fraction of samples", fontsize=8)
    ax.set_title(f"Generated samples by predicted class (mean confidence {confidence:.2f})", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def plot_energy_histograms(scores: dict[str, torch.Tensor], path, title: str = "") -> Path:
    """One panel per set: a histogram of f(x) over the test digits' histogram (the reference), AUROC in the title."""
    keys = [k for k in scores if k != "test"]
    ref = scores["test"].double().numpy()
    ref = ref[np.isfinite(ref)]
    ncols = 3
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = _figure(figsize=(4.0 * ncols, 2.9 * nrows))
    # fixed margins: constrained layout would cost more than the drawing itself
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.22 / nrows, top=1 - 0.24 / nrows, wspace=0.2, hspace=0.62)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        other = scores[key].double().numpy()
        other = other[np.isfinite(other)]
        both = np.concatenate([ref, other])
        if both.size == 0:
            ax.set_axis_off()
            continue
        lo, hi = np.percentile(both, [0.5, 99.5])
        if not hi > lo:
            lo, hi = both.min() - 0.5, both.max() + 0.5
        bins = np.linspace(lo, hi, 50)
        ax.hist(np.clip(ref, lo, hi), bins=bins, alpha=0.55, density=True, label=SET_LABELS["test"], color="tab:blue")
        ax.hist(
            np.clip(other, lo, hi), bins=bins, alpha=0.55, density=True, label=SET_LABELS.get(key, key), color="tab:red"
        )
        try:
            a = f"AUROC {auroc(scores['test'], scores[key]):.3f}"
        except ValueError:
            a = "AUROC n/a"
        ax.set_title(f"{SET_LABELS.get(key, key)}\n{a}", fontsize=9)
        ax.set_xlabel("f(x) = -E(x)  (clipped to the 0.5-99.5 percentile range)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


def plot_transform_examples(model: nn.Module, image: torch.Tensor, path, noise_seed: int = 0) -> Path:
    """The seed's image-to-image comparison: one test image, noisy, flipped, shrunk, each labelled with its f(x)
    (the same noise draw as ``ood.seed_table`` with the same ``noise_seed``)."""
    img = image.reshape(1, *image.shape[-3:])
    noisy = add_gaussian_noise(img, generator=torch.Generator().manual_seed(noise_seed))
    variants = [("test image", img), ("+ N(0, 0.3²)", noisy), ("flipped", flip(img)), ("shrunk ×2", shrink(img))]
    batch = torch.cat([v for _, v in variants])
    scores = batch_scores(model, batch)
    labels = [f"{name}\nf(x) = {float(score):.2f}" for (name, _), score in zip(variants, scores)]
    picture = grid_image(batch, len(variants), title="A test image and the seed's transformations", cell_labels=labels)
    return save_image(picture, Path(path))
