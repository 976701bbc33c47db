"""What determines the rest of a training run, and how it is saved and restored (exact resume).

- Random streams: every stream a run draws from is seeded with ``derive_seed(config.seed, attempt, stream)``
  (``attempt`` counts divergence roll-backs), so a retry draws new numbers and epoch-end work (validation noise,
  rand_out images, picture chains) never disturbs the training streams.
- ``run_state(trainer)`` / ``restore_run_state(trainer, state)``: everything besides the model weights (optimizer,
  scheduler, replay buffer, generator, sampler counters, data order, divergence monitor, counters and, for a
  checkpoint, the global torch / Python / NumPy RNG states).
- ``checkpoint_payload(trainer)`` is what ``checkpoints/last.pt`` and ``best.pt`` hold (layout: ``checkpoint.py``);
  ``resume_from(trainer, ckpt, source)`` checks that a checkpoint fits the trainer's config and restores it.
- Data-parallel runs (``distributed.py``): the replay buffer, the generator, the sampler counters and the global RNG
  states are per rank; everything else is the same on every rank. A checkpoint of N > 1 ranks gathers the per-rank
  parts to rank 0: ``trainer["buffer"]`` holds all shards merged into one buffer of ``buffer_size`` images (a valid
  one-process buffer, oldest images first), the rest of ``trainer`` is rank 0's, and ``distributed`` holds
  ``{"world_size": N, "ranks": [{"buffer_capacity", "buffer_ptr", "generator", "sampler", "rng"} per rank]}``.
  Resuming on the same number of ranks splits the merged buffer back into the exact shards (bit-identical
  continuation on CPU); on another number it re-shards (oldest images spread evenly; ranks beyond the saved ones
  get fresh streams): the run continues, not bit-identically. A one-rank checkpoint has no ``distributed`` entry
  and the layout of every earlier version.
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
    "merge_buffer_shards",
    "split_buffer",
    "RANK_STATE_KEYS",
]

# Independent random streams of a run, each seeded with derive_seed(seed, attempt, stream).
S_GEN, S_SAMPLER, S_DATA, S_MONITOR = 1, 2, 3, 5  # real-image noise + buffer, Langevin noise, data order, gap check
S_VAL, S_RANDOUT, S_VIS, S_VIS_START, S_VIS_BUF = 1000, 2000, 3000, 4000, 5000  # + epoch: epoch-end work


# Per-rank streams of a data-parallel run use stream + rank * RANK_STRIDE (far above every stream number above).
RANK_STRIDE = 1 << 32


def derive_seed(seed: int, attempt: int, stream: int = 0, rank: int = 0) -> int:
    """A distinct 62-bit seed per (run seed, retry attempt, stream, rank) (splitmix64-style mixing); rank 0's seeds
    are those of a single process."""
    stream = stream + rank * RANK_STRIDE
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


def checkpoint_payload(trainer) -> dict | None:
    """A training checkpoint's contents (``save_checkpoint`` adds the format marker and version).

    In a data-parallel run of N > 1 ranks this is a collective (every rank must call it): each rank's buffer shard
    and random states are gathered to rank 0, which gets the payload; the other ranks get None."""
    ctx = getattr(trainer, "dist", None)
    if ctx is None or ctx.world_size == 1:
        return {
            "kind": "train",
            "model": model_record(trainer.model),
            "config": trainer.config.to_dict(),
            "trainer": run_state(trainer),
            "device": str(trainer.device),
        }
    mine = _rank_state(trainer)
    shards = ctx.gather_to_main(mine)
    if not ctx.is_main:
        return None
    state = run_state(trainer)
    state["buffer"] = merge_buffer_shards([s["buffer"] for s in shards])
    ranks = [
        {
            "buffer_capacity": s["buffer"]["capacity"],
            "buffer_ptr": s["buffer"]["ptr"],
            "buffer_rng": s["buffer"].get("rng"),
            **{k: s[k] for k in RANK_STATE_KEYS},
        }
        for s in shards
    ]
    return {
        "kind": "train",
        "model": model_record(trainer.model),
        "config": trainer.config.to_dict(),
        "trainer": state,
        "device": str(trainer.device),
        "distributed": {"world_size": ctx.world_size, "ranks": ranks},
    }


# What differs between the ranks of a data-parallel run (besides the replay-buffer shard).
RANK_STATE_KEYS = ("generator", "sampler", "rng")


def _rank_state(trainer) -> dict:
    return {
        "buffer": trainer.buffer.state_dict(),
        "generator": trainer.gen.get_state(),
        "sampler": trainer.sampler.state_dict(),
        "rng": global_rng_state(),
    }


# ------------------------------------------------------------------------------------------ replay-buffer shards
def _age_order(capacities: list[int], ptrs: list[int]) -> torch.Tensor:
    """Indices into the concatenated shard storages, oldest images first, shards interleaved by relative age (the
    j-th oldest of a shard of c images has age key (2j + 1) / 2c; ties in shard order)."""
    keys, index, offset = [], [], 0
    for cap, ptr in zip(capacities, ptrs):
        j = torch.arange(cap, dtype=torch.int64)
        keys.append((2 * j + 1).double() / (2 * cap))
        index.append(offset + (ptr + j) % cap)
        offset += cap
    order = torch.sort(torch.cat(keys), stable=True).indices
    return torch.cat(index)[order]


def merge_buffer_shards(shards: list[dict]) -> dict:
    """One replay-buffer state (capacity = the shards' total, write pointer 0) holding every shard's images, oldest
    first, so that a one-process buffer loaded from it overwrites the oldest images first."""
    storages = [s["storage"] for s in shards]
    order = _age_order([s["capacity"] for s in shards], [int(s["ptr"]) for s in shards])
    merged = torch.cat(storages).index_select(0, order)
    return {**shards[0], "storage": merged, "ptr": 0, "capacity": int(merged.shape[0])}


def split_buffer(merged: dict, capacities: list[int], ptrs: list[int] | None = None) -> list[dict]:
    """The inverse of ``merge_buffer_shards``: with the shards' own capacities and pointers it gives back the exact
    shards; with other capacities (and pointers 0) it re-shards, every shard getting a share of every age."""
    storage = merged["storage"]
    if sum(capacities) != storage.shape[0]:
        raise ValueError(f"shard capacities {capacities} do not add up to the buffer's {storage.shape[0]} images")
    ptrs = [0] * len(capacities) if ptrs is None else [int(p) for p in ptrs]
    flat = torch.empty_like(storage)
    flat[_age_order(capacities, ptrs)] = storage
    return [
        {**merged, "storage": part.clone(), "ptr": ptr, "capacity": cap}
        for part, cap, ptr in zip(flat.split(capacities), capacities, ptrs)
    ]


def _world_of(ckpt: dict) -> tuple[int, list[dict]]:
    """(ranks that wrote ``ckpt``, their per-rank records); a one-rank (or older) checkpoint gives one record."""
    section = ckpt.get("distributed")
    if isinstance(section, dict):
        return int(section["world_size"]), list(section["ranks"])
    stored = ckpt["trainer"]
    buf = stored["buffer"]
    record = {"buffer_capacity": buf["capacity"], "buffer_ptr": buf["ptr"], "buffer_rng": buf.get("rng")}
    record.update({k: stored[k] for k in RANK_STATE_KEYS if k in stored})
    return 1, [record]


def _sampler_on(state: dict, device) -> dict:
    """A sampler state whose noise counter is on ``device`` (a rank may resume on another device index)."""
    counters = dict(state.get("counters", {}))
    if str(device) not in counters and len(counters) == 1:
        counters = {str(device): next(iter(counters.values()))}
    return {**state, "counters": counters}


def _rank_restore_state(trainer, ckpt: dict) -> tuple[dict, bool, str | None]:
    """(the run state for this rank, whether its streams were saved, a note when the buffer was re-sharded)."""
    stored = ckpt["trainer"]
    ctx = trainer.dist
    saved_world, records = _world_of(ckpt)
    merged = stored["buffer"] if saved_world > 1 else merge_buffer_shards([stored["buffer"]])
    if saved_world == ctx.world_size:
        caps = [int(r["buffer_capacity"]) for r in records]
        shards = split_buffer(merged, caps, [int(r["buffer_ptr"]) for r in records])
        note = None
    else:
        shards = split_buffer(merged, ctx.shard_sizes(int(merged["capacity"])))
        note = (
            f"a {saved_world}-rank checkpoint resumed on {ctx.world_size} rank(s): replay buffer re-sharded, the run "
            "continues but not bit-identically"
        )
    state = dict(stored)
    state["buffer"] = shards[ctx.rank]
    have = ctx.rank < saved_world
    if have:
        record = records[ctx.rank]
        state.update({k: record[k] for k in RANK_STATE_KEYS if k in record})
        state["sampler"] = _sampler_on(state["sampler"], trainer.device)
        if saved_world == ctx.world_size and record.get("buffer_rng") is not None:
            state["buffer"]["rng"] = record["buffer_rng"]
    return state, have, note


def resume_from(trainer, ckpt: dict, source: str) -> str | None:
    """Restore ``trainer`` from a loaded training checkpoint; ``CheckpointError`` if it does not fit the config.

    In a data-parallel run each rank takes its own shard and streams (see the module docstring); returns a note for
    the run's log when the checkpoint was written by another number of ranks (re-sharded), else None."""
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
    ctx = getattr(trainer, "dist", None)
    try:
        if ctx is None or (ctx.world_size == 1 and "distributed" not in ckpt):
            restore_run_state(trainer, stored)
            return None
        state, have_streams, note = _rank_restore_state(trainer, ckpt)
        restore_run_state(trainer, state)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{source}: cannot restore the training state ({type(exc).__name__}: {exc})") from None
    if not have_streams:  # a rank the checkpoint did not have: streams of its own, as after a roll-back
        attempt, seed = trainer.recoveries, trainer.config.seed
        trainer.sampler.manual_seed(ctx.seed(seed, attempt, S_SAMPLER))
        trainer.gen.manual_seed(ctx.seed(seed, attempt, S_GEN))
    return note
