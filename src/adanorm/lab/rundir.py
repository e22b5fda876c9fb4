"""The run directory: one trainer at a time, and whether it starts, resumes or is refused.

Run directory layout (written by the main process only)::

    config.yaml          the resolved config
    run.json             git commit, seed, library versions, device, world size, command line
    metrics.jsonl        one JSON object per train log / evaluation / final test line
    checkpoint_last.pt   everything needed to resume (model, optimizer, scheduler, RNG, counters)
                         and the task's own training state (``Task.state_dict``), e.g. the LM's
                         memory; other DDP processes keep their RNG and task state in
                         ``rng_rank<r>_step<s>.pt`` / ``task_state_rank<r>_step<s>.pt``
    checkpoint_best.pt   the model with the best validation metric
    checkpoint_avg_<step>.pt  with ``train.average_checkpoints`` N > 0: the weights at each of
                         the last N evaluations, averaged into the final model
    results.json         final valid and test metrics of the best (or averaged) model, training
                         totals and throughput (e.g. target tokens per second); marks a finished
                         run
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from . import checkpoint as ckpt
from .config import check_resume, dump_yaml
from .runinfo import environment, git_state

__all__ = ["LAST", "BEST", "RESULTS", "METRICS", "RunDirError", "lock_run_dir",
           "prepare_run_dir", "write_provenance"]

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
RESULTS = "results.json"
METRICS = "metrics.jsonl"


class RunDirError(RuntimeError):
    """The run directory is in a state that the requested action would damage."""


def lock_run_dir(run_dir: Path) -> IO[str] | None:
    """Refuse a second trainer in the same directory (e.g. two sweeps over one output); return
    the open lock file, to be closed when the run ends (None where POSIX locks do not exist).

    The lock is an advisory ``flock`` on ``.lock``: the OS drops it when the process dies,
    even by ``kill -9``, so a crashed run never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(
            f"another process is training in {run_dir} (it holds {run_dir}/.lock)"
        ) from None
    return handle


def prepare_run_dir(
    run_dir: Path, cfg: Mapping[str, Any], *, resume: bool, is_main: bool
) -> dict[str, Any] | None:
    """Check the run directory; return the last checkpoint if it should be resumed."""
    last = run_dir / LAST
    if (run_dir / RESULTS).exists():
        raise RunDirError(f"{run_dir} already holds a finished run ({RESULTS} exists)")
    if resume:
        if last.exists():
            if (run_dir / "config.yaml").exists():
                check_resume(run_dir / "config.yaml", cfg)
            return _checked_last_checkpoint(run_dir)
        if is_main:
            _drop_lines_without_checkpoint(run_dir)
        return None
    if last.exists() or (run_dir / METRICS).exists():
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose "
            f"another --run-dir"
        )
    return None


def _checked_last_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The last checkpoint, refused unless ``metrics.jsonl`` still holds every line it saw.

    Those lines come from training that the checkpoint cannot replay: a shorter file (lost
    lines) or one whose recorded length does not end a line (a replaced file) cannot be
    resumed exactly, and extending it would write NUL bytes that break every reader.
    """
    state = ckpt.load_checkpoint(
        run_dir / LAST,
        required=("model", "optimizer", "scheduler", "trainer", "rng", "metrics_bytes"),
    )
    recorded = int(state["metrics_bytes"])
    path = run_dir / METRICS
    size = path.stat().st_size if path.exists() else 0
    ends_a_line = recorded == 0
    if 0 < recorded <= size:
        with open(path, "rb") as fh:
            fh.seek(recorded - 1)
            ends_a_line = fh.read(1) == b"\n"
    if size < recorded or not ends_a_line:
        raise RunDirError(
            f"{path} has {size} bytes but {LAST} (step {state['trainer']['step']}) recorded "
            f"{recorded} bytes ending a line: lines written before that checkpoint were lost "
            f"or the file was replaced, so the run cannot be resumed exactly; restore "
            f"{METRICS}, or delete {run_dir} and train again"
        )
    return state


def _drop_lines_without_checkpoint(run_dir: Path) -> None:
    """A resumed run without a checkpoint starts over at step 0, replaying every line."""
    path = run_dir / METRICS
    if path.exists() and path.stat().st_size:
        print(
            f"{run_dir}: no {LAST} yet, so the run starts over; dropping the "
            f"{METRICS} lines of the attempt that stopped before its first checkpoint",
            file=sys.stderr,
        )
        with open(path, "r+b") as fh:
            fh.truncate(0)


def write_provenance(
    run_dir: Path,
    cfg: Mapping[str, Any],
    dataset: str,
    device: torch.device,
    world_size: int,
    argv: list[str],
    *,
    resuming: bool,
) -> None:
    """``config.yaml`` and ``run.json`` (``run.resumed.json`` when resuming a checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    info = {
        "task": cfg["task"],
        "dataset": dataset,
        "seed": cfg["seed"],
        "git": git_state(),
        "environment": environment(device),
        "world_size": world_size,
        "command": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # A run.json left by an attempt that never reached a checkpoint describes nothing that
    # survives: a fresh start replaces it; only a resumed checkpoint gets run.resumed.json.
    name = "run.resumed.json" if resuming else "run.json"
    ckpt.atomic_write_text(run_dir / name, json.dumps(info, indent=2) + "\n")
