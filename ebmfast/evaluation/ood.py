"""Out-of-distribution analysis of an energy model: the seed's energy comparisons, AUROC, energy histograms.

The model's output is ``f(x) = -E(x)``: a higher score means "more like the training data". An energy model that
learned MNIST should score test digits above random noise, and above digits that were corrupted, flipped or shrunk.
The seed tutorial shows this with a handful of mean scores (:func:`seed_table`); here the same transformations are
applied to many test images, and each transformed set is compared with the untouched test digits by the area under
the ROC curve (:func:`auroc`): the probability that a random test digit scores higher than a random image of the
other set (0.5: indistinguishable; 1.0: perfectly separated; below 0.5: the model prefers the other set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import reference

__all__ = [
    "NOISE_STD",
    "SET_LABELS",
    "OODReport",
    "auroc",
    "uniform_noise",
    "add_gaussian_noise",
    "flip",
    "shrink",
    "batch_scores",
    "seed_table",
    "build_ood_sets",
    "ood_analysis",
]

NOISE_STD = 0.3  # the seed's "test image + noise": x + N(0, 0.3^2), clamped to [-1, 1]

# Machine keys (JSON) -> labels for tables and plots. "test" is the in-distribution reference for every AUROC.
SET_LABELS = {
    "test": "test digits",
    "train": "training digits",
    "noise": "uniform noise U(-1, 1)",
    "test_noisy": "test + N(0, 0.3²) noise",
    "test_flipped": "test flipped",
    "test_shrunk": "test shrunk ×2 into a corner",
    "fashion_mnist": "Fashion-MNIST",
}


def auroc(positive, negative) -> float:
    """Area under the ROC curve for scores where ``positive`` should be higher than ``negative``.

    Equals P(p > n) + 0.5 P(p = n) over independent draws p from ``positive`` and n from ``negative``: the
    Mann-Whitney U statistic of the positives divided by ``len(positive) * len(negative)``, computed from ranks of
    the pooled scores, tied values sharing their average rank. O(N log N). Raises ValueError on an empty set or a
    NaN score (infinite scores rank normally).
    """
    pos = _as_float64(positive, "positive")
    neg = _as_float64(negative, "negative")
    pooled = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # 1-based ranks: a group of c tied values occupying positions end-c+1 .. end gets their mean, end - (c-1)/2.
    group_end = np.cumsum(counts).astype(np.float64)
    avg_rank = group_end - (counts - 1) / 2.0
    rank_sum_pos = avg_rank[inverse[: len(pos)]].sum()
    u_pos = rank_sum_pos - len(pos) * (len(pos) + 1) / 2.0
    return float(u_pos / (len(pos) * len(neg)))


def _as_float64(scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(scores, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"auroc: {name} scores must hold at least one value, got an empty set")
    if np.isnan(arr).any():
        raise ValueError(f"auroc: {name} scores must not be NaN, got {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


# ----------------------------------------------------------------------------------------------- transformations
def uniform_noise(n: int, shape=(1, 28, 28), generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` images of U(-1, 1) noise (CPU, float32): the seed's "random images" and its chain starts."""
    return torch.rand((n, *shape), generator=generator).mul_(2.0).sub_(1.0)


def add_gaussian_noise(
    x: torch.Tensor, std: float = NOISE_STD, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + N(0, std²), clamped to [-1, 1] (the seed's ``img_noisy``)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + std * z).clamp_(-1.0, 1.0)


def flip(x: torch.Tensor) -> torch.Tensor:
    """Flip both spatial axes (the seed's ``exmp_img.flip(dims=(1, 2))`` on a (1, 28, 28) image): a 180° turn."""
    return x.flip(dims=(-2, -1))


def shrink(x: torch.Tensor) -> torch.Tensor:
    """Every 2nd pixel of the image, placed in the bottom-right quarter of a background (-1) image (the seed's
    ``img_tiny``)."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, -1.0)
    out[..., h // 2 :, w // 2 :] = x[..., ::2, ::2]
    return out


@torch.no_grad()
def batch_scores(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device=None) -> torch.Tensor:
    """``reference.energy_scores`` (f(x) = -E(x)) of a whole set: in eval mode and batches of ``batch_size``, as a
    float32 CPU tensor of shape (N,)."""
    if device is None:
        params = list(model.parameters())
        device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = [
            reference.energy_scores(model, x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


# ----------------------------------------------------------------------------------------------- the analysis
def seed_table(
    model: nn.Module,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    generator: torch.Generator | None = None,
    batch: int = 128,
    noise_seed: int = 0,
) -> dict[str, float]:
    """The seed's numbers: mean f(x) of 128 random images and of a 128-image training batch; f(x) of one test
    image (the first), of that image + N(0, 0.3²) noise (drawn with ``noise_seed``, as in
    :func:`plot_transform_examples`), flipped, and shrunk ×2 into a corner."""
    idx = torch.randperm(len(train_images), generator=generator)[:batch]
    img = test_images[:1]
    noisy = add_gaussian_noise(img, generator=torch.Generator().manual_seed(noise_seed))
    rows = {
        "random_images_mean": batch_scores(model, uniform_noise(batch, tuple(img.shape[1:]), generator)).mean(),
        "training_batch_mean": batch_scores(model, train_images[idx]).mean(),
    }
    singles = batch_scores(model, torch.cat([img, noisy, flip(img), shrink(img)]))
    rows.update(
        test_image=singles[0], test_image_noisy=singles[1], test_image_flipped=singles[2], test_image_shrunk=singles[3]
    )
    return {k: float(v) for k, v in rows.items()}


def build_ood_sets(
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    fashion: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The image sets compared with the test digits, ``n`` images each (fewer if a source has fewer): the test
    digits themselves, training digits, uniform noise, and the seed's three transformations of the same test
    digits; Fashion-MNIST test images when given."""
    if n <= 0:
        raise ValueError(f"n (images per set) must be positive, got {n}")
    test = test_images[torch.randperm(len(test_images), generator=generator)[:n]]
    sets = {
        "test": test,
        "train": train_images[torch.randperm(len(train_images), generator=generator)[:n]],
        "noise": uniform_noise(len(test), tuple(test.shape[1:]), generator),
        "test_noisy": add_gaussian_noise(test, generator=generator),
        "test_flipped": flip(test),
        "test_shrunk": shrink(test),
    }
    if fashion is not None:
        sets["fashion_mnist"] = fashion[torch.randperm(len(fashion), generator=generator)[:n]]
    return sets


@dataclass
class OODReport:
    seed_table: dict[str, float]
    scores: dict[str, torch.Tensor]  # set key -> f(x) per image
    summary: dict[str, dict] = field(default_factory=dict)  # set key -> {n, mean, std, auroc_vs_test}
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"seed_table": self.seed_table, "sets": self.summary, "notes": list(self.notes)}


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def ood_analysis(
    model: nn.Module,
    test_images: torch.Tensor,
    train_images: torch.Tensor,
    fashion: torch.Tensor | None = None,
    n: int = 1000,
    seed: int = 0,
) -> OODReport:
    """Scores of every set of :func:`build_ood_sets`, their mean/std and AUROC of the test digits against each."""
    gen = torch.Generator().manual_seed(seed)
    table = seed_table(model, train_images, test_images, generator=gen, noise_seed=seed)
    sets = build_ood_sets(test_images, train_images, n, generator=gen, fashion=fashion)
    scores = {k: batch_scores(model, v) for k, v in sets.items()}
    report = OODReport(table, scores)
    ref = scores["test"]
    for key, s in scores.items():
        finite = torch.isfinite(s)
        row = {
            "label": SET_LABELS[key],
            "n": int(len(s)),
            "mean": _finite_or_none(float(s[finite].mean())) if finite.any() else None,
            "std": _finite_or_none(float(s[finite].std())) if finite.sum() > 1 else None,
            "non_finite": int((~finite).sum()),
            "auroc_vs_test": None,
        }
        if key != "test":
            try:
                row["auroc_vs_test"] = auroc(ref, s)
            except ValueError as exc:  # a diverged model can give NaN scores: say so instead of failing
                report.notes.append(f"AUROC test vs {SET_LABELS[key]} not computed: {exc}")
        if row["non_finite"]:
            report.notes.append(f"{SET_LABELS[key]}: {row['non_finite']} of {row['n']} scores are not finite")
        report.summary[key] = row
    return report
