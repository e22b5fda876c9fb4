"""MNIST with the paper's 3-layer CNN (see :mod:`adanorm.lab.tasks.vision` for the design).

Splits, as the paper's 55k / 5k / 10k (and TensorFlow's classic ``read_data_sets``): the *first*
5,000 images of the official training file are the validation set, the other 55,000 are for
training, and the official 10,000-image test file is the test set.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ...data import require_dataset
from ...schema import Bool, DropoutRate, IntList, TaskSchema
from ...task import ClassificationTask, TensorDataset, register_task, stack_batch
from .model import ConvNet

__all__ = ["MnistTask", "read_idx"]

VALID_SIZE = 5000
# Mean and std of the 60k training pixels scaled to [0, 1] (the usual MNIST constants).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (images: magic 2051, labels: magic 2049)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic == 2051:
        count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8)
    raise ValueError(f"{path}: not an IDX image or label file (magic number {magic})")


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _load(directory: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    key = str(directory.resolve())
    if key not in _CACHE:

        def images(name: str) -> torch.Tensor:
            pixels = torch.from_numpy(read_idx(directory / name).copy()).float().div_(255.0)
            return pixels.sub_(PIXEL_MEAN).div_(PIXEL_STD).unsqueeze(1)

        def labels(name: str) -> torch.Tensor:
            return torch.from_numpy(read_idx(directory / name).astype(np.int64))

        _CACHE[key] = (
            images("train-images-idx3-ubyte.gz"),
            labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"),
            labels("t10k-labels-idx1-ubyte.gz"),
        )
    return _CACHE[key]


@register_task("mnist")
class MnistTask(ClassificationTask):
    datasets = ("mnist",)
    # Defaults: the paper preset's CNN (presets/mnist/paper.yaml).
    config_schema = TaskSchema(
        data={"download": Bool(False, "fetch missing files into the data root (sha256-checked)")},
        model={
            "channels": IntList([32, 64, 128], "output channels of each conv layer", low=1),
            "dropout": DropoutRate(0.0),
        },
    )

    def dataset(self, split: str) -> Dataset:
        directory = require_dataset(
            "mnist", self.data_dir, download=self.cfg["data"]["download"]
        )
        train_x, train_y, test_x, test_y = _load(directory)
        if split == "train":
            return TensorDataset(train_x[VALID_SIZE:], train_y[VALID_SIZE:])
        if split == "valid":
            return TensorDataset(train_x[:VALID_SIZE], train_y[:VALID_SIZE])
        if split == "test":
            return TensorDataset(test_x, test_y)
        raise ValueError(f"unknown split {split!r}")

    def collate(self, examples: Any, split: str) -> Any:
        return stack_batch(examples)

    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        return ConvNet(1, 28, m["channels"], 10, self.make_norm, float(m["dropout"]))
