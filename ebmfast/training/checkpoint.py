"""Checkpoint files: atomic writes, a format marker and version, and clear errors for files we cannot use.

Layout of a file written by ``save_checkpoint(path, state)``: ``torch.save`` of ``{"format": FORMAT,
"format_version": FORMAT_VERSION, "ebmfast_version": ..., **state}``. Training checkpoints (``ebmfast.training``) put in
``state``: ``model`` ({"class", "kwargs", "state_dict"}), ``config`` (TrainConfig as a dict) and ``trainer``
(everything that determines the rest of the run: optimizer, scheduler, replay buffer, RNG states, epoch/iteration).
A checkpoint of a data-parallel run of N > 1 ranks adds ``distributed`` ({"world_size": N, "ranks": [per-rank buffer
pointer and capacity, generator, sampler and global RNG states]}), with ``trainer["buffer"]`` holding all ranks'
shards merged into one buffer (``state.py``). Still format version 1: a reader that does not know ``distributed``
resumes such a file as one process would, with the merged buffer and rank 0's streams.

Writes are atomic: the bytes go to a temporary file in the same folder, which is flushed and fsync'd, then renamed
over the target with ``os.replace``, and the folder is fsync'd. A crash or ``kill -9`` at any moment leaves either
the old file or the new one, never a torn one (at worst a stray ``.NAME.*.tmp`` file, removed by
``remove_stale_temps``). A write that fails for a reason of the machine or the path (disk full, file-size limit,
quota, name too long, permissions: ``ebmfast.errors.WRITE_FAULTS``) raises ``OutputPathError`` naming the path and
the cause, and leaves the previous file as it was.

Reading uses ``torch.load(weights_only=True)``: a file holding arbitrary pickled objects is refused rather than
executed. Every problem raises ``CheckpointError`` (``ebmfast.errors``), a ``ValueError`` that the CLI reports in one
line with exit 2.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, write_failure

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_record",
    "remove_stale_temps",
    "TORCH_MAGIC",
    "is_torch_archive",
]

FORMAT = "ebmfast.checkpoint"
FORMAT_VERSION = 1
TORCH_MAGIC = b"PK\x03\x04"  # how a file written by torch.save (a zip archive) starts


def is_torch_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable file that starts like a ``torch.save`` archive (a checkpoint, a cache)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(TORCH_MAGIC)) == TORCH_MAGIC
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (a dict of tensors and plain Python values) to ``path`` atomically; returns the path."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    reserved = {"format", "format_version"} & set(state)
    if reserved:
        raise ValueError(f"state must not set the reserved key(s) {sorted(reserved)}")
    from .. import __version__

    path = Path(path)
    if _quietly(path.is_dir):
        raise IsADirectoryError(f"checkpoint path {path} is a folder; give a file name such as {path / 'last.pt'}")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "ebmfast_version": __version__, **state}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        fault = write_failure(exc, path, "checkpoint") if isinstance(exc, Exception) else None
        if fault is None:
            raise
        kept = "; the previous checkpoint there is unchanged" if _quietly(path.is_file) else ""
        raise type(fault)(f"{fault}{kept}") from None
    _fsync_dir(path.parent)
    return path


def _quietly(check) -> bool:
    """``check()``, False where the path cannot even be looked at (e.g. a name too long)."""
    try:
        return check()
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``folder`` by interrupted saves (only call when no save is running there)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; ``CheckpointError`` if it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (file not found)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a folder, expected a file such as {path / 'last.pt'}")
    if isinstance(map_location, (str, torch.device)):
        dev = torch.device(map_location)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"map_location={map_location!r} asks for CUDA, which this machine does not have")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or never written")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != TORCH_MAGIC:
        raise CheckpointError(
            f"{path} is not an ebmfast checkpoint: not a torch.save zip archive (it starts with {head!r})"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split())
        at = detail.find("Unsupported global")
        detail = detail[at : at + 160] if at >= 0 else detail[:160]
        raise CheckpointError(
            f"{path} is not an ebmfast checkpoint: it holds Python objects that a safe load refuses to "
            f"unpickle ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): truncated, corrupted or not a torch file "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not an ebmfast checkpoint (no format marker {FORMAT!r}; it holds {what})")
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, written by a newer ebmfast "
            f"({obj.get('ebmfast_version', '?')}); this ebmfast reads versions <= {FORMAT_VERSION}: upgrade ebmfast"
        )
    if version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version}")
    return obj


def model_record(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint stores about a CNNModel: its class, constructor arguments and weights."""
    from ..models import CNNModel

    if type(model) is not CNNModel:
        raise TypeError(f"model_record expects a CNNModel, got {type(model).__name__}")
    return {
        "class": "CNNModel",
        "kwargs": {
            "hidden_features": model.hidden_features,
            "out_dim": model.out_dim,
            "in_channels": model.in_channels,
        },
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def build_model(record: Any, source: str = "checkpoint", map_location="cpu"):
    """A CNNModel from a ``model_record`` dict; ``CheckpointError`` if it does not describe one."""
    from ..models import CNNModel

    if not isinstance(record, dict) or not {"class", "kwargs", "state_dict"} <= set(record):
        raise CheckpointError(f"{source} has no usable model record (expected keys class, kwargs, state_dict)")
    if record["class"] != "CNNModel":
        raise CheckpointError(f"{source} holds a {record['class']!r} model; this ebmfast knows only 'CNNModel'")
    kwargs = record["kwargs"]
    try:
        model = CNNModel(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad model arguments {kwargs!r} ({exc})") from None
    try:
        model.load_state_dict(record["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        msg = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{source}: the stored weights do not fit CNNModel({kwargs}): {' '.join(msg[:3])[:400]}"
        ) from None
    bad = [k for k, v in model.state_dict().items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights (NaN or inf) in {bad[:4]}: a diverged run")
    return model.to(map_location if map_location is not None else "cpu")


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """``(model, config_dict)`` from a training checkpoint; the model is in eval mode on ``map_location``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model = build_model(ckpt.get("model"), source=str(path), map_location=map_location)
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no training config (expected a dict under 'config')")
    hidden = config.get("hidden_features")
    if hidden is not None and hidden != model.hidden_features:
        raise CheckpointError(
            f"{path}: the config says hidden_features={hidden} but the stored model has {model.hidden_features}"
        )
    return model.eval(), dict(config)
