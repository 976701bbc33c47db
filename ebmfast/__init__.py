"""ebmfast: fast, trustworthy Langevin sampling and contrastive-divergence training for deep EBMs.

The engine sits flat in this package: ``models`` (the seed's CNN), ``reference`` (the eager reference sampler),
``sampler`` (``LangevinSampler``) -> ``energy_grad`` (eager / compiled gradient) + ``langevin`` (fused update op) ->
``kernels`` (Triton), ``graph`` (CUDA-graph replay), ``buffer`` (``ReplayBuffer``), ``pcd`` (the seed's ``Sampler``
API). Around it, by job: ``training/`` (``Trainer``, ``TrainConfig``, checkpoints), ``evaluation/`` (generation,
out-of-distribution scores, sample quality, the report), ``benchmark/`` (throughput measurement), ``cli/`` (the
``ebmfast`` command); shared leaves: ``data``, ``errors``, ``devices``.

The outer entry points below are imported on first use, so ``import ebmfast`` loads only the engine (and neither
matplotlib, TensorBoard, mlxtend nor torchvision).
"""

from __future__ import annotations

import importlib

from .buffer import ReplayBuffer
from .models import CNNModel, Swish
from .reference import langevin_reference
from .sampler import BACKENDS, LangevinSampler

__version__ = "0.1.0"

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "PCDSampler": "ebmfast.pcd",
    "Trainer": "ebmfast.training.trainer",
    "FitResult": "ebmfast.training.trainer",
    "TrainConfig": "ebmfast.training.config",
    "load_model": "ebmfast.training.checkpoint",
    "load_dataset": "ebmfast.data",
    "generate": "ebmfast.evaluation.generate",
    "evaluate_model": "ebmfast.evaluation.report",
    "QualityCallback": "ebmfast.evaluation.quality",
    "bench_sampler": "ebmfast.benchmark.throughput",
    "bench_train": "ebmfast.benchmark.training",
    "UsageError": "ebmfast.errors",
}

__all__ = [
    "CNNModel",
    "Swish",
    "LangevinSampler",
    "ReplayBuffer",
    "langevin_reference",
    "BACKENDS",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ebmfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next look-up does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
