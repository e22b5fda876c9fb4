"""A run leaves the process as it found it: thread count, deterministic mode, RNG states."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from lab_helpers import smoke_cfg

from adanorm.lab.trainer import Trainer


@pytest.fixture
def process_defaults() -> Iterator[None]:
    """Known process settings that differ from the smoke preset's (1 thread, deterministic)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _seed_caller() -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)


@pytest.mark.usefixtures("process_defaults")
def test_a_finished_run_restores_threads_determinism_and_rng(tmp_path: Path) -> None:
    _seed_caller()
    expected = _draws()
    _seed_caller()
    trainer = Trainer(smoke_cfg("train.threads=1", "train.deterministic=true"), tmp_path / "r",
                      argv=["test"])
    assert torch.get_num_threads() == 2  # constructing a trainer changes nothing yet
    trainer.fit()
    assert torch.get_num_threads() == 2
    assert not torch.are_deterministic_algorithms_enabled()
    assert _draws() == expected  # the caller's random streams continue where they were


@pytest.mark.usefixtures("process_defaults")
def test_a_failed_run_restores_them_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def crash(self, resume_from_checkpoint: bool) -> dict:
        seen["threads"] = torch.get_num_threads()
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "_fit", crash)
    trainer = Trainer(smoke_cfg("train.threads=1", "train.deterministic=true"), tmp_path / "r",
                      argv=["test"])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert seen == {"threads": 1, "deterministic": True}  # the run itself had its settings
    assert torch.get_num_threads() == 2
    assert not torch.are_deterministic_algorithms_enabled()
