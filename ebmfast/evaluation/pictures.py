"""The figures of the ``ebmfast evaluate`` report (matplotlib, imported only when a figure is drawn).

Sample grids: ``plot_generation_steps`` (the seed's figure: chains from noise at the shown steps), ``plot_samples``
(generated or replay-buffer samples labelled by the classifier), ``plot_transform_examples`` (one test image, noisy,
flipped, shrunk). Charts: ``plot_chain_energy`` (f(x) along the chains), ``plot_energy_histograms`` (test digits vs
each out-of-distribution set, AUROC in the titles), ``plot_class_distribution``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import require
from .ood import SET_LABELS, add_gaussian_noise, auroc, energy_scores, flip, shrink

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


def plot_generation_steps(trajectory_images: torch.Tensor, steps_shown: list[int], path: Path) -> None:
    """Rows: chains; columns: the state at each shown step (the seed's generation figure)."""
    cols, rows = trajectory_images.shape[:2]  # (columns, chains, 1, 28, 28)
    pad = 2
    canvas = _canvas(trajectory_images.transpose(0, 1).reshape(-1, 1, 28, 28), cols, pad=pad)
    fig = _figure(figsize=(0.75 * cols + 0.6, 0.75 * rows + 0.7))
    ax = fig.add_axes((0.02, 0.12, 0.96, 0.8))
    ax.imshow(canvas, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([pad + c * (28 + pad) + 14 for c in range(cols)], [str(s) for s in steps_shown], fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("Langevin step (0 = U(-1, 1) start)", fontsize=8)
    ax.set_title(f"Generation from noise: {rows} chains", fontsize=9)
    fig.savefig(path, dpi=90)


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


def _canvas(images: torch.Tensor, cols: int, pad: int = 2, label_h: int = 0) -> np.ndarray:
    """Tile (N, 1, 28, 28) images in [-1, 1] into one array (white gaps, ``label_h`` pixels above each for text)."""
    n = len(images)
    rows = math.ceil(n / cols)
    cell_h, cell_w = 28 + pad + label_h, 28 + pad
    canvas = np.ones((rows * cell_h + pad, cols * cell_w + pad), dtype=np.float32)
    imgs = images.detach().float().cpu().clamp(-1, 1).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * cell_h + label_h, pad + c * cell_w
        canvas[y : y + 28, x : x + 28] = imgs[i, 0]
    return canvas


def plot_samples(samples: torch.Tensor, probs: torch.Tensor | None, path: Path, cols: int = 8) -> None:
    """A grid of generated samples, each labelled with the classifier's digit and confidence (one image, so it
    draws quickly however many samples it shows)."""
    label_h = 9 if probs is not None else 0
    canvas = _canvas(samples, cols, label_h=label_h)
    rows = math.ceil(len(samples) / cols)
    fig = _figure(figsize=(0.95 * cols, 0.95 * rows * (39 + label_h) / 39))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if probs is not None:
        for i in range(len(samples)):
            r, c = divmod(i, cols)
            p, k = probs[i].max(0)
            ax.text(
                2 + c * 30 + 14,
                2 + r * (30 + label_h) + label_h / 2,
                f"{int(k)} ({float(p):.2f})",
                ha="center",
                va="center",
                fontsize=6.5,
                color="black",
            )
    fig.savefig(path, dpi=80)


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
    """The seed's image-to-image comparison: one test image, noisy, flipped, shrunk, each titled with its f(x)
    (the same noise draw as :func:`seed_table` with the same ``noise_seed``)."""
    img = image.reshape(1, *image.shape[-3:])
    noisy = add_gaussian_noise(img, generator=torch.Generator().manual_seed(noise_seed))
    variants = [("test image", img), ("+ N(0, 0.3²)", noisy), ("flipped", flip(img)), ("shrunk ×2", shrink(img))]
    batch = torch.cat([v for _, v in variants])
    s = energy_scores(model, batch)
    fig = _figure(figsize=(2.0 * len(variants), 2.4), layout="constrained")
    axes = fig.subplots(1, len(variants))
    for ax, (name, _), x, score in zip(axes, variants, batch, s):
        ax.imshow(x[0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{name}\nf(x) = {float(score):.2f}", fontsize=9)
        ax.set_axis_off()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
