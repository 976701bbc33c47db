"""Sample quality for MNIST energy models, measured with a small digit classifier the project trains itself.

- :class:`DigitClassifier`: a two-convolution CNN (0.11 M parameters). Trained on the training digits of the
  evaluation data set (``mnist5k``: 4,500 images, 8 epochs of batch 128: 5.5 s on an idle 2-core CPU, 96.4% accuracy
  on the 500 held-out digits, measured), and cached next to the checkpoint (:func:`load_or_train_classifier`). The
  cache stores a fingerprint of the training data and the training settings; a cache that does not match (other
  data, other settings, another classifier version) is reported as stale and retrained. A file at the cache path
  that is not a classifier cache of ours (a checkpoint, anything else) is never overwritten: ``OutputPathError``
  (:func:`check_classifier_cache`).
- For a batch of generated samples: the predicted class distribution, the mean max-softmax confidence and the
  entropy of the class histogram (:func:`class_statistics`): a model that generates every digit gives near-uniform
  fractions (entropy close to ln 10 = 2.30 nats) with high confidence; blobs give low confidence.
- The Fréchet distance between Gaussians fitted to the classifier's penultimate-layer features of generated and of
  real images (:func:`frechet_distance`; the FID recipe with an MNIST feature extractor, so its values are not
  comparable with Inception FIDs). It depends on the number of images, so it is always shown next to the
  real-vs-real baseline (two disjoint real sets of the same size) and real-vs-noise (:func:`fd_baselines`).
- :class:`QualityCallback`: the same numbers every N epochs during training.

Everything here runs without scipy: the matrix square root comes from symmetric eigendecompositions.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataSplits, load_dataset
from ..errors import OutputPathError
from ..sampler import LangevinSampler
from ..training.checkpoint import FORMAT, is_torch_archive
from ..training.config import config_value
from ..validation import check_int
from .generate import generate_from_noise

__all__ = [
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_VERSION",
    "CLASSIFIER_FILENAME",
    "ClassifierConfig",
    "DigitClassifier",
    "StaleCacheError",
    "data_fingerprint",
    "classifier_meta",
    "train_classifier",
    "evaluate_classifier",
    "load_cached_classifier",
    "check_classifier_cache",
    "load_or_train_classifier",
    "classifier_outputs",
    "class_statistics",
    "sqrtm_psd",
    "frechet_distance",
    "fd_baselines",
    "sample_quality",
    "QualityCallback",
]

CLASSIFIER_FORMAT = "ebmfast-mnist-classifier"
CLASSIFIER_VERSION = 1  # bump when DigitClassifier or the training recipe changes: old caches become stale
CLASSIFIER_FILENAME = "mnist_classifier.pt"


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3  # peak of a one-cycle schedule (Adam)
    max_shift: int = 2  # random translation of each batch by up to this many pixels (augmentation)
    max_train_images: int = 12000  # full MNIST: a fixed subset keeps first-use training well under a minute
    seed: int = 0


class DigitClassifier(nn.Module):
    """conv(1->16) -> pool -> conv(16->32) -> pool -> fc(1568->64) [features] -> fc(64->10) [logits]."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, self.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, 64): the space of the Fréchet distance."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"DigitClassifier expects images of shape (N, 1, 28, 28) in [-1, 1], got {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class StaleCacheError(Exception):
    """A cached classifier that cannot be used; the message says why."""


# ----------------------------------------------------------------------------------------------- training + cache
def _training_subset(data: DataSplits, cfg: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.train_images, data.train_labels
    if len(x) > cfg.max_train_images:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_train_images]
        x, y = x[idx], y[idx]
    return x, y


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the images' and labels' bytes and shapes: which data a cached classifier was trained on."""
    h = hashlib.sha256()
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def classifier_meta(data: DataSplits, cfg: ClassifierConfig) -> dict:
    """What a cache must match to be reused."""
    x, y = _training_subset(data, cfg)
    return {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "data": data.name,
        "train_fingerprint": data_fingerprint(x, y),
        "config": asdict(cfg),
    }


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels, filling with the background value -1."""
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    h, w = x.shape[-2:]
    # contiguous: a strided view makes the convolutions several times slower on CPU
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w].contiguous()


@torch.no_grad()
def evaluate_classifier(
    clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Accuracy on ``images``."""
    device = next(clf.parameters()).device
    clf.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = clf(images[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size].cpu()).sum())
    return correct / max(1, len(images))


def train_classifier(
    data: DataSplits,
    cfg: ClassifierConfig = ClassifierConfig(),
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[DigitClassifier, dict]:
    """Train a :class:`DigitClassifier` on ``data``'s training digits; returns it (eval mode) and
    ``{"val_accuracy", "train_seconds", "n_train", "n_val"}`` (accuracy on ``data``'s held-out split)."""
    from tqdm.auto import tqdm

    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise ValueError(f"classifier epochs and batch_size must be positive, got {cfg.epochs} and {cfg.batch_size}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # model init from the config's seed, caller's RNG untouched
        torch.manual_seed(cfg.seed)
        clf = DigitClassifier().to(device)
    x, y = _training_subset(data, cfg)
    x, y = x.to(device), y.to(device)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        desc="training the MNIST classifier",
        disable=not progress,
        leave=False,
        mininterval=1.0,
    )
    # Dropout draws from the global RNG: fork it so training is reproducible and leaves the caller's state alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        clf.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=gen).to(device)
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                dy, dx = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (2,), generator=gen).tolist()
                loss = F.cross_entropy(clf(_shift(x[idx], dy, dx)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    bar.close()
    clf.eval()
    info = {
        "train_seconds": time.perf_counter() - t0,
        "val_accuracy": evaluate_classifier(clf, data.val_images, data.val_labels),
        "n_train": int(len(x)),
        "n_val": int(len(data.val_images)),
    }
    return clf, info


def load_cached_classifier(path, expected_meta: dict, device="cpu") -> tuple[DigitClassifier, dict]:
    """The cached classifier at ``path`` if its metadata equals ``expected_meta``; else StaleCacheError (why)."""
    path = Path(path)
    if not path.is_file():
        raise StaleCacheError(f"no cached classifier at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise StaleCacheError(f"{path} could not be read as a classifier cache ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict) or "state_dict" not in blob:
        raise StaleCacheError(
            f"{path} is not an ebmfast classifier cache (expected a dict with 'meta' and 'state_dict')"
        )
    meta = blob["meta"]
    for key in ("format", "version", "data", "train_fingerprint", "config"):
        have, want = meta.get(key), expected_meta.get(key)
        if have == want:
            continue
        if key == "train_fingerprint":
            what = "the training data differ"
        elif key == "config" and isinstance(have, dict) and isinstance(want, dict):
            diffs = [
                f"{k} {have.get(k)!r} -> {want.get(k)!r}"
                for k in sorted(set(have) | set(want))
                if have.get(k) != want.get(k)
            ]
            what = "classifier config changed (" + ", ".join(diffs) + ")"
        else:
            what = f"{key} is {have!r}, expected {want!r}"
        raise StaleCacheError(f"{path} is stale: {what}")
    clf = DigitClassifier()
    try:
        clf.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise StaleCacheError(f"{path}: weights do not fit DigitClassifier ({exc})") from None
    return clf.to(device).eval(), dict(blob.get("info", {}))


def check_classifier_cache(path) -> Path:
    """``path`` as a place to write the classifier cache: nothing there yet, or a classifier cache of ours (current
    or stale). Anything else (a folder, a checkpoint, any other file) raises ``OutputPathError`` rather than being
    overwritten."""
    path = Path(path)
    if not os.path.lexists(path):
        return path
    if path.is_dir():
        raise OutputPathError(
            f"classifier cache {path} is a folder; give a file name such as {path / CLASSIFIER_FILENAME}"
        )
    refusal = (
        f"classifier cache {path} exists and is not an ebmfast classifier cache ({{}}); it is left alone: "
        "give another classifier path or move the file"
    )
    if not path.is_file():
        raise OutputPathError(refusal.format("not a regular file"))
    if not is_torch_archive(path):
        raise OutputPathError(refusal.format("not a torch file"))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise OutputPathError(refusal.format(f"unreadable: {type(exc).__name__}")) from None
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        kind = (
            "an ebmfast checkpoint" if isinstance(blob, dict) and blob.get("format") == FORMAT else "another torch file"
        )
        raise OutputPathError(refusal.format(kind))
    return path


def load_or_train_classifier(
    path,
    data: DataSplits,
    cfg: ClassifierConfig = ClassifierConfig(),
    device="cpu",
    progress: bool = True,
) -> tuple[DigitClassifier, dict]:
    """Reuse the cache at ``path`` when it matches ``data`` and ``cfg``, else train and (re)write it.

    Returns the classifier and an info dict: ``cache`` is ``"hit"``, ``"trained"`` (no cache) or ``"retrained"``
    (``stale_reason`` says why), plus ``val_accuracy``, ``train_seconds`` (of the training that made the weights),
    ``path``, and ``cache_error`` when the file could not be written. A file at ``path`` that is not a classifier
    cache raises ``OutputPathError`` before any training (:func:`check_classifier_cache`)."""
    path = check_classifier_cache(path)
    meta = classifier_meta(data, cfg)
    stale_reason = None
    try:
        clf, info = load_cached_classifier(path, meta, device)
        info.update(cache="hit", path=str(path))
        return clf, info
    except StaleCacheError as exc:
        if path.exists():
            stale_reason = str(exc)
    clf, info = train_classifier(data, cfg, device, progress)
    info.update(cache="retrained" if stale_reason else "trained", path=str(path))
    if stale_reason:
        info["stale_reason"] = stale_reason
    blob = {
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in clf.state_dict().items()},
        "info": {k: info[k] for k in ("val_accuracy", "train_seconds", "n_train", "n_val")},
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        info["cache_error"] = f"could not write {path}: {exc}"
        warnings.warn(f"classifier not cached: could not write {path}: {exc}", stacklevel=2)
    return clf, info


# ----------------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def classifier_outputs(
    clf: DigitClassifier, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float64 (N, 64), softmax probabilities float64 (N, 10)) on CPU."""
    device = next(clf.parameters()).device
    clf.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = clf.features(images[i : i + batch_size].to(device).float())
        feats.append(f.double().cpu())
        probs.append(torch.softmax(clf.head(f).double(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def class_statistics(probs: torch.Tensor) -> dict:
    """Predicted class fractions, mean max-softmax confidence, and the entropy (nats) of the class histogram
    (ln 10 = 2.303 when all ten digits are equally frequent, 0 when one digit is all there is)."""
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must have shape (N >= 1, classes), got {tuple(probs.shape)}")
    k = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=k).double()
    frac = counts / counts.sum()
    nz = frac[frac > 0]
    return {
        "class_fractions": [float(v) for v in frac],
        "mean_confidence": float(probs.max(1).values.mean()),
        "class_entropy": max(0.0, float(-(nz * nz.log()).sum())),  # max(): no "-0.0" for a single class
        "max_class_entropy": math.log(k),
    }


def sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from round-off set to 0)."""
    mat = (mat + mat.T) / 2
    w, v = torch.linalg.eigh(mat)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    return (root + root.T) / 2  # exactly symmetric (the product is only up to round-off)


def _gaussian(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = feats.double()
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {tuple(feats.shape)}")
    mu = feats.mean(0)
    centered = feats - mu
    return mu, centered.T @ centered / (feats.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    ||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½).

    The last trace equals tr((S_a S_b)^½) of the usual formula; written with symmetric matrices it needs only
    eigendecompositions (float64), no general matrix square root."""
    if feats_a.shape[1:] != feats_b.shape[1:]:
        raise ValueError(
            f"feature sets must have the same dimension, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    mu_a, s_a = _gaussian(feats_a)
    mu_b, s_b = _gaussian(feats_b)
    root_a = sqrtm_psd(s_a)
    inner = root_a @ s_b @ root_a
    w = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_cross = w.clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_cross
    return max(float(fd), 0.0)


def fd_baselines(
    clf: DigitClassifier,
    data: DataSplits,
    n: int,
    generator: torch.Generator | None = None,
) -> dict:
    """The reference set and the baselines every generated batch of ``n`` images is compared with.

    Returns ``{"reference_feats", "fd_real_vs_real", "fd_noise_vs_real", "n", "baseline_source"}``: the reference
    is ``n`` random training digits; the real-vs-real baseline uses ``n`` other real digits (the held-out split
    when it has ``n`` images, which like generated samples were not seen by the classifier; otherwise training
    digits disjoint from the reference), the noise baseline ``n`` images of U(-1, 1) noise."""
    if n < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 images per set, got n={n}")
    train = data.train_images
    perm = torch.randperm(len(train), generator=generator)
    if len(train) < n:
        raise ValueError(f"n={n} images requested but the training split has only {len(train)}")
    ref = train[perm[:n]]
    if len(data.val_images) >= n:
        other = data.val_images[torch.randperm(len(data.val_images), generator=generator)[:n]]
        source = f"{n} held-out digits vs {n} training digits"
    elif len(train) >= 2 * n:
        other = train[perm[n : 2 * n]]
        source = f"two disjoint sets of {n} training digits"
    else:
        raise ValueError(
            f"n={n} is too large for a real-vs-real baseline: {len(train)} training and "
            f"{len(data.val_images)} held-out images"
        )
    noise = torch.rand((n, *ref.shape[1:]), generator=generator).mul_(2).sub_(1)
    ref_f, _ = classifier_outputs(clf, ref)
    other_f, _ = classifier_outputs(clf, other)
    noise_f, _ = classifier_outputs(clf, noise)
    return {
        "reference_feats": ref_f,
        "fd_real_vs_real": frechet_distance(other_f, ref_f),
        "fd_noise_vs_real": frechet_distance(noise_f, ref_f),
        "n": n,
        "baseline_source": source,
    }


def sample_quality(clf: DigitClassifier, samples: torch.Tensor, reference_feats: torch.Tensor) -> dict:
    """Class statistics of ``samples`` and their Fréchet distance to the reference features."""
    feats, probs = classifier_outputs(clf, samples)
    out = class_statistics(probs)
    out["fd"] = frechet_distance(feats, reference_feats)
    out["n"] = int(len(samples))
    return out


# ----------------------------------------------------------------------------------------------- training callback
class QualityCallback:
    """Sample-quality numbers every ``every`` epochs of training (``ebmfast train --quality-every N``).

    ``on_epoch_end(trainer, epoch)`` is called after each epoch with the 0-based index of the epoch that just ended;
    it acts when ``(epoch + 1) % every == 0`` and after the run's last epoch (``trainer.config.epochs``), and returns
    ``{"quality_fid", "quality_confidence", "quality_class_entropy", "quality_fid_real_baseline",
    "quality_seconds"}`` (else None), which the trainer logs as curves.

    Samples: ``n_samples`` chains of ``steps`` steps from U(-1, 1) on ``trainer.model``, from fixed starts and a
    fixed noise seed, so successive values differ only through the model. On CUDA they come from
    ``trainer.sampler``, whose own noise stream is saved and restored around the call (training draws exactly the
    noise it would have drawn without the callback). On CPU an eager sampler with the same step size, noise, clip
    and precision is used instead: a compiled backend would recompile for the new batch shape, which costs more
    there than the sampling itself (the trainer's own picture grids do the same).

    The classifier is cached at ``classifier_path``, default ``trainer.ckpt_dir/mnist_classifier.pt`` (where
    ``ebmfast evaluate`` looks for it next to the checkpoints), else ``trainer.out_dir/mnist_classifier.pt``, else
    kept in memory only; it is trained on first use. The digits come from ``data`` (a DataSplits), else
    ``trainer.data``, else ``load_dataset(config.data)``.
    """

    def __init__(
        self,
        every: int,
        n_samples: int = 256,
        steps: int = 256,
        seed: int = 0,
        classifier_path=None,
        classifier_config: ClassifierConfig = ClassifierConfig(),
        data: DataSplits | None = None,
        progress: bool = False,
    ):
        self.every = check_int(every, "every", note=" (a number of epochs)")
        self.n_samples = check_int(n_samples, "n_samples", minimum=2, note=" (a covariance needs 2 samples)")
        self.steps = check_int(steps, "steps")
        self.seed = seed
        self.classifier_path = classifier_path
        self.classifier_config = classifier_config
        self.data = data
        self.progress = progress
        self.classifier: DigitClassifier | None = None
        self.classifier_info: dict | None = None
        self._baselines: dict | None = None
        self._cpu_sampler = None

    def _data(self, trainer) -> DataSplits:
        if self.data is None:
            d = getattr(trainer, "data", None)
            if isinstance(d, DataSplits):
                self.data = d
            else:
                cfg = getattr(trainer, "config", None)
                self.data = load_dataset(config_value(cfg, "data", "mnist5k"), config_value(cfg, "data_root", None))
        return self.data

    def _setup(self, trainer) -> None:
        if self.classifier is not None:
            return
        device = torch.device(getattr(trainer, "device", "cpu"))
        data = self._data(trainer)
        path = self.classifier_path
        if path is None:
            folder = getattr(trainer, "ckpt_dir", None) or getattr(trainer, "out_dir", None)
            path = Path(folder) / CLASSIFIER_FILENAME if folder is not None else None
        if path is None:
            self.classifier, self.classifier_info = train_classifier(
                data, self.classifier_config, device, progress=self.progress
            )
            self.classifier_info["cache"] = "none"
        else:
            self.classifier, self.classifier_info = load_or_train_classifier(
                path, data, self.classifier_config, device, progress=self.progress
            )
        gen = torch.Generator().manual_seed(self.seed + 1)
        self._baselines = fd_baselines(self.classifier, data, self.n_samples, generator=gen)

    def _sampler(self, trainer):
        sampler = trainer.sampler
        device = torch.device(getattr(trainer, "device", "cpu"))
        if device.type != "cpu" or getattr(sampler, "backend", "eager") == "eager":
            return sampler
        if self._cpu_sampler is None or self._cpu_sampler.model is not trainer.model:
            same = dict(sampler.settings.sampler_kwargs(), precision=sampler.precision)
            self._cpu_sampler = LangevinSampler(
                trainer.model, steps=self.steps, backend="eager", seed=self.seed, **same
            )
        return self._cpu_sampler

    def should_run(self, epoch: int, total_epochs: int | None = None) -> bool:
        return (epoch + 1) % self.every == 0 or (total_epochs is not None and epoch + 1 == total_epochs)

    def on_epoch_end(self, trainer, epoch: int) -> dict[str, float] | None:
        total = config_value(getattr(trainer, "config", None), "epochs", None)
        if not self.should_run(epoch, total if isinstance(total, int) else None):
            return None
        t0 = time.perf_counter()
        self._setup(trainer)
        samples = generate_from_noise(
            self._sampler(trainer),
            trainer.model,
            self.n_samples,
            self.steps,
            self.seed,
            device=getattr(trainer, "device", None),
        )
        q = sample_quality(self.classifier, samples.float(), self._baselines["reference_feats"])
        return {
            "quality_fid": q["fd"],
            "quality_confidence": q["mean_confidence"],
            "quality_class_entropy": q["class_entropy"],
            "quality_fid_real_baseline": self._baselines["fd_real_vs_real"],
            "quality_seconds": time.perf_counter() - t0,
        }
