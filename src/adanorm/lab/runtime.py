"""Process-level pieces of a run: seeding, the device, torch's process-wide settings, moving
batches to the device, and recognising an out-of-memory error."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .bf16_cpu import bf16_matmul, fp32_bf16_matmul
from .config import ConfigError

__all__ = [
    "NonfiniteLossWatch",
    "TrainingOutOfMemoryError",
    "is_out_of_memory",
    "out_of_memory_error",
    "seed_everything",
    "resolve_device",
    "move_to_device",
    "process_settings",
]


class TrainingOutOfMemoryError(MemoryError):
    """The device ran out of memory in a training step or an evaluation; the message says which
    config value to lower."""


def is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; torch's CPU allocator a plain RuntimeError.
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def out_of_memory_error(
    cfg: Mapping[str, Any], device: torch.device, step: int, during: str, exc: BaseException
) -> TrainingOutOfMemoryError:
    """The error to raise for ``exc``, naming the config value to lower."""
    data, accum = cfg["data"], cfg["optim"]["accum_steps"]
    if during == "training":
        key = "max_tokens" if "max_tokens" in data else "batch_size"
        advice = (
            f"lower data.{key} (now {data[key]}) and raise optim.accum_steps (now {accum}) "
            f"by the same factor to keep the update"
        )
    else:
        key = "eval_max_tokens" if "eval_max_tokens" in data else "eval_batch_size"
        advice = f"lower data.{key} (now {data[key]})"
    what = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return TrainingOutOfMemoryError(
        f"out of memory on {device} during {during} at step {step} ({what}); "
        f"{advice}, or train.amp=bf16, or a smaller model"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return device


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def process_settings(tcfg: Mapping[str, Any], device: torch.device) -> Iterator[None]:
    """Apply the run's process-wide torch settings; restore the previous ones on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = ckpt.capture_rng()
    products = contextlib.ExitStack()
    try:
        torch.set_num_threads(int(tcfg["threads"]) or 1)
        if device.type == "cpu" and tcfg["amp"] == "bf16" and bf16_matmul() == "fp32-gemm":
            # Without bf16 GEMM hardware torch's scalar fallback is ~100x slower than fp32.
            products.enter_context(fp32_bf16_matmul())
        if tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        yield
    finally:
        products.close()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        ckpt.restore_rng(rng)


class NonfiniteLossWatch:
    """Remembers, on the device, the first update whose loss was not finite.

    Checking ``isfinite`` on the host would wait for the device every micro-step; the flag is
    read by :meth:`raise_if_seen` only where the trainer synchronizes anyway (logs, evaluations,
    checkpoints), so no log line, best model or checkpoint comes from a run past a non-finite
    loss.
    """

    def __init__(self) -> None:
        self._first_step: torch.Tensor | None = None
        self._first_loss: torch.Tensor | None = None

    def note(self, loss: torch.Tensor, step: int) -> None:
        if self._first_step is None or self._first_loss is None:
            self._first_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._first_loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = (self._first_step < 0) & ~torch.isfinite(loss)
        self._first_step = torch.where(first, step, self._first_step)
        self._first_loss = torch.where(first, loss.to(torch.float64), self._first_loss)

    def raise_if_seen(self, current_step: int) -> None:
        if self._first_step is None:
            return
        step = int(self._first_step)
        if step >= 0:
            raise FloatingPointError(
                f"non-finite training loss {float(self._first_loss)} at step {step} "
                f"(noticed at step {current_step}); try a lower optim.lr, "
                f"optim.clip_norm > 0 or train.amp=none"
            )
