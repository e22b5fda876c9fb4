"""Atomic checkpoints made of state_dicts and plain data only.

Nothing here pickles a module or an optimizer object: every file loads with
``torch.load(path, weights_only=True)``.  Writes go to a temporary file in the same directory, are
fsynced, then renamed over the destination, so a crash leaves either the old or the new
checkpoint, never a truncated one.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "capture_rng",
    "restore_rng",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_stream",
    "CheckpointError",
]


class CheckpointError(RuntimeError):
    """A checkpoint is empty, truncated, not an adanorm checkpoint, or lacks an entry."""


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask), e.g. 0o644."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _mkstemp_for(path: Path) -> tuple[int, str]:
    # mkstemp creates files readable by their owner only (0600): reports and run files would
    # stay private to the user who wrote them, unlike every other file the lab writes.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, _new_file_mode())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def atomic_write_stream(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``
    (concurrent writers each rename a complete file); on any failure the temporary file is removed
    and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_for(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write_stream(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write_stream(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, refusing anything but plain data.

    A file that is not a readable mapping holding the ``required`` entries raises
    :class:`CheckpointError` in one line, instead of torch's ``EOFError``, ``KeyError`` or
    weights-only advice (which suggests loading untrusted pickles).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # EOFError, OSError, UnpicklingError, KeyError, RuntimeError, ...
        raise CheckpointError(f"{path}: {_unreadable(path, exc)}; {_ADVICE}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not an adanorm checkpoint; {_ADVICE}"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a complete adanorm checkpoint (no {', '.join(map(repr, missing))} "
            f"entry); {_ADVICE}"
        )
    return state


_ADVICE = "delete the run directory and train the run again, or restore the file from a copy"


def _unreadable(path: Path, exc: Exception) -> str:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "the file is empty"
    # torch's own text is left out: for a weights-only failure it suggests weights_only=False,
    # which would unpickle whatever the file holds.
    return (
        f"cannot load it: it is truncated or not an adanorm checkpoint ({size} bytes, "
        f"torch.load raised {type(exc).__name__})"
    )


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training step can touch, as tensors and plain Python data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    # random.setstate wants tuples; a round trip through some serializers yields lists.
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value
