"""Checkpoint averaging (``train.average_checkpoints``): the weights at each of the last N
evaluations are kept in the run directory, and their element-wise mean becomes the final model,
as fairseq's ``average_checkpoints.py`` does for translation."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt

__all__ = ["CheckpointAverager", "SNAPSHOT_PREFIX"]

SNAPSHOT_PREFIX = "checkpoint_avg_"


class CheckpointAverager:
    """Keeps ``run_dir/checkpoint_avg_<step>.pt`` for the last ``keep`` snapshots and averages
    them.  Only the main process snapshots; every process reads the average."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        if keep <= 0:
            raise ValueError(f"train.average_checkpoints must be > 0 to average, got {keep}")
        self.run_dir = Path(run_dir)
        self.keep = keep

    def snapshot(self, model_state: dict[str, torch.Tensor], step: int) -> None:
        """Save the weights at ``step`` and delete the snapshots older than the last ``keep``."""
        ckpt.atomic_save(
            {"format": "adanorm-lab-snapshot/1", "model": model_state, "step": step},
            self.run_dir / f"{SNAPSHOT_PREFIX}{step:09d}.pt",
        )
        for old in self.snapshots()[: -self.keep]:
            old.unlink()

    def snapshots(self) -> list[Path]:
        return sorted(self.run_dir.glob(f"{SNAPSHOT_PREFIX}*.pt"))

    def average(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The element-wise mean of the kept snapshots (floating tensors; others from the last)
        and the steps they were taken at."""
        paths = self.snapshots()
        loaded = [ckpt.load_checkpoint(path, ["model", "step"]) for path in paths]
        states = [blob["model"] for blob in loaded]
        averaged = {}
        for key, value in states[-1].items():
            if torch.is_floating_point(value):
                total = sum(state[key].double() for state in states)
                averaged[key] = (total / len(states)).to(value.dtype)
            else:
                averaged[key] = value
        return averaged, [int(blob["step"]) for blob in loaded]
