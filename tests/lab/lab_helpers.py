"""Shared helpers for the lab tests: tiny configs, run helpers, the real-data switch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("yaml")
pytest.importorskip("sklearn")

from adanorm.lab.config import load_config  # noqa: E402
from adanorm.lab.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoke_cfg(*overrides: str, task: str = "digits") -> dict:
    return load_config(task, "smoke", ["train.progress=false", *overrides])


def train(run_dir: Path, *overrides: str, resume: bool = False, task: str = "digits") -> dict:
    return Trainer(smoke_cfg(*overrides, task=task), run_dir, resume=resume, argv=["test"]).fit()


def mnist_dir() -> Path | None:
    root = os.environ.get("ADANORM_DATA")
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
    return path if (path / "mnist" / "train-images-idx3-ubyte.gz").exists() else None


needs_mnist = pytest.mark.skipif(
    mnist_dir() is None,
    reason="real MNIST not found: set ADANORM_DATA to a directory holding mnist/*.gz "
    "(CI sets ADANORM_DATA=../shared/data)",
)
