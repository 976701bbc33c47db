"""What determines the rest of a training run, and how it is saved and restored (exact resume).

- Random streams: every stream a run draws from is seeded with ``derive_seed(config.seed, attempt, stream)``
  (``attempt`` counts divergence roll-backs), so a retry draws new numbers and epoch-end work (validation noise,
  rand_out images, picture chains) never disturbs the training streams.
- ``run_state(trainer)`` / ``restore_run_state(trainer, state)``: everything besides the model weights (optimizer,
  scheduler, replay buffer, generator, sampler counters, data order, divergence monitor, counters and, for a
  checkpoint, the global torch / Python / NumPy RNG states).
- ``checkpoint_payload(trainer)`` is what ``checkpoints/last.pt`` and ``best.pt`` hold (layout: ``checkpoint.py``);
  ``resume_from(trainer, ckpt, source)`` checks that a checkpoint fits the trainer's config and restores it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import CheckpointError
from .checkpoint import build_model, model_record

__all__ = [
    "derive_seed",
    "S_GEN",
    "S_SAMPLER",
    "S_DATA",
    "S_MONITOR",
    "S_VAL",
    "S_RANDOUT",
    "S_VIS",
    "S_VIS_START",
    "S_VIS_BUF",
    "global_rng_state",
    "set_global_rng_state",
    "run_state",
    "restore_run_state",
    "checkpoint_payload",
    "resume_from",
]

# Independent random streams of a run, each seeded with derive_seed(seed, attempt, stream).
S_GEN, S_SAMPLER, S_DATA, S_MONITOR = 1, 2, 3, 5  # real-image noise + buffer, Langevin noise, data order, gap check
S_VAL, S_RANDOUT, S_VIS, S_VIS_START, S_VIS_BUF = 1000, 2000, 3000, 4000, 5000  # + epoch: epoch-end work


def derive_seed(seed: int, attempt: int, stream: int = 0) -> int:
    """A distinct 62-bit seed per (run seed, retry attempt, stream) (splitmix64-style mixing)."""
    v = (seed * 0x9E3779B97F4A7C15 + attempt * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    v ^= v >> 31
    v = (v * 0xD6E8FEB86659FD93) & (2**64 - 1)
    v ^= v >> 32
    return v & (2**62 - 1)


# ------------------------------------------------------------------------------------------ global RNG states
def global_rng_state() -> dict:
    """torch's CPU (and CUDA, when initialised), Python's and NumPy's global generator states, as tensors and plain
    values (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuple(obj):
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuple(o) for o in obj)
    return obj


# ------------------------------------------------------------------------------------------ the trainer's state
def run_state(trainer, include_global_rng: bool = True) -> dict:
    """Everything besides the model weights that determines the rest of ``trainer``'s run."""
    state = {
        "epoch": trainer.epoch,
        "iteration": trainer.iteration,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "buffer": trainer.buffer.state_dict(),
        "generator": trainer.gen.get_state(),
        "sampler": trainer.sampler.state_dict(),
        "batches": trainer.batches.state_dict(),
        "monitor": trainer.rollback.monitor.state_dict(),
        "best_val": trainer.best_val,
        "recoveries": trainer.recoveries,
        "lr_scale": trainer.lr_scale,
        "epoch_metrics": dict(trainer.epoch_metrics),
    }
    if include_global_rng:
        state["rng"] = global_rng_state()
    return state


def restore_run_state(trainer, state: dict, restore_global_rng: bool = True) -> None:
    """The inverse of ``run_state`` (the model weights are restored separately)."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.buffer.load_state_dict(state["buffer"])
    trainer.gen.set_state(state["generator"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.batches.load_state_dict(state["batches"])
    trainer.rollback.monitor.load_state_dict(state["monitor"])
    trainer.epoch = int(state["epoch"])
    trainer.iteration = int(state["iteration"])
    trainer.best_val = float(state["best_val"])
    trainer.recoveries = int(state["recoveries"])
    trainer.lr_scale = float(state["lr_scale"])
    trainer.epoch_metrics = dict(state.get("epoch_metrics", {}))
    if restore_global_rng and "rng" in state:
        set_global_rng_state(state["rng"])


def checkpoint_payload(trainer) -> dict:
    """A training checkpoint's contents (``save_checkpoint`` adds the format marker and version)."""
    return {
        "kind": "train",
        "model": model_record(trainer.model),
        "config": trainer.config.to_dict(),
        "trainer": run_state(trainer),
        "device": str(trainer.device),
    }


def resume_from(trainer, ckpt: dict, source: str) -> None:
    """Restore ``trainer`` from a loaded training checkpoint; ``CheckpointError`` if it does not fit the config."""
    if ckpt.get("kind") != "train" or not isinstance(ckpt.get("trainer"), dict):
        raise CheckpointError(f"{source} is not a resumable training checkpoint (it has no trainer state)")
    model = build_model(ckpt.get("model"), source=source)
    config = trainer.config
    if model.hidden_features != config.hidden_features:
        raise CheckpointError(
            f"{source} holds a model with hidden_features={model.hidden_features}, but the "
            f"config asks for {config.hidden_features}"
        )
    stored = ckpt["trainer"]
    cap = stored.get("buffer", {}).get("capacity")
    if cap != config.buffer_size:
        raise CheckpointError(
            f"{source} holds a replay buffer of {cap} images, but the config asks for buffer_size={config.buffer_size}"
        )
    trainer.model.load_state_dict(model.state_dict())
    try:
        restore_run_state(trainer, stored)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{source}: cannot restore the training state ({type(exc).__name__}: {exc})") from None
