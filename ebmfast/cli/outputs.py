"""Output paths of the commands, checked before any work starts: a path that cannot be written is an
``OutputPathError`` (one line, exit 2), not a traceback after minutes of sampling.

A check creates nothing that stays: it finds the nearest folder that exists on the way to the path and writes (and
removes) a temporary file there, which is the only test that root, read-only mounts and pseudo file systems such as
``/proc`` all answer truthfully.

An output file never replaces a file of another kind that the commands write: an existing ``torch.save`` archive (a
checkpoint, a classifier cache) at a picture, JSON or CSV path is refused, not overwritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import OutputPathError
from ..training.checkpoint import is_torch_archive

__all__ = ["output_file", "output_dir"]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _nearest_existing(folder: Path) -> Path:
    while not _exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_names(target: Path, flag: str) -> None:
    """No name on the way to ``target`` may be longer than the file system allows (checked before anything looks at
    the path itself, which would fail with ENAMETOOLONG)."""
    try:
        name_max = os.pathconf(_nearest_existing(target.parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in target.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise OutputPathError(
                f"{flag}: the name {part[:24]}... is {size} bytes long; this file system allows {name_max} bytes "
                "per file or folder name"
            )


def _probe(folder: Path, flag: str, target: Path) -> None:
    """``folder`` (or, where it does not exist yet, its nearest existing parent) must be a folder we can write in."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputPathError(f"{flag} {target}: {existing} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ebmfast-write-check-", dir=existing)
    except OSError as exc:
        raise OutputPathError(f"{flag} {target}: cannot write in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def output_file(path, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file the command will write (replacing it if it exists); ``suffixes``: the allowed endings."""
    path = Path(path)
    _check_names(path, flag)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{flag} must name a {'/'.join(suffixes)} file, got {str(path)!r}")
    if path.is_dir():
        example = path / f"out{suffixes[0] if suffixes else ''}"
        raise OutputPathError(f"{flag} {path} is a folder; give a file name such as {example}")
    if _exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"{flag} {path}: the file exists and is not writable")
    if is_torch_archive(path):
        raise OutputPathError(
            f"{flag} {path} holds a torch file (a checkpoint or cache), which this output would replace; "
            "give another file name"
        )
    _probe(path.parent, flag, path)
    return path


def output_dir(path, flag: str) -> Path:
    """A folder the command will create (if needed) and write files into."""
    path = Path(path)
    _check_names(path, flag)
    if _exists(path) and not path.is_dir():
        raise OutputPathError(f"{flag} {path} exists and is not a folder")
    _probe(path, flag, path)
    return path
