"""scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the package: no download).

The out-of-the-box demo task: the same CNN family as MNIST on real handwritten digits small enough
to train five norms in well under two minutes.  Splits are fixed (independent of the run seed):
a class-stratified 1,197 / 300 / 300 train / valid / test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ...schema import DropoutRate, IntList, TaskSchema
from ...task import ClassificationTask, TensorDataset, register_task, stack_batch
from .model import ConvNet

__all__ = ["DigitsTask", "digits_splits"]

SPLIT_SEED = 0
VALID_SIZE = TEST_SIZE = 300


def digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed, stratified splits, standardized with the training pixels' mean and std."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install 'adanorm[lab]'") from exc
    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    # Deal each class's shuffled indices round-robin so every split keeps the class balance.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    n = len(labels)
    share = {"valid": VALID_SIZE / n, "test": TEST_SIZE / n}
    for cls in np.unique(labels):
        members = [int(i) for i in order if labels[i] == cls]
        k_valid = round(len(members) * share["valid"])
        k_test = round(len(members) * share["test"])
        parts["valid"] += members[:k_valid]
        parts["test"] += members[k_valid : k_valid + k_test]
        parts["train"] += members[k_valid + k_test :]
    train_pixels = images[parts["train"]]
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    out = {}
    for split, idx in parts.items():
        idx_sorted = sorted(idx)
        x = torch.from_numpy((images[idx_sorted] - mean) / std).unsqueeze(1)
        out[split] = (x, torch.from_numpy(labels[idx_sorted]))
    return out


_CACHE: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}


@register_task("digits")
class DigitsTask(ClassificationTask):
    datasets = ("digits",)
    # Defaults: the digits paper/cpu presets' CNN.  The data ships with scikit-learn: no keys.
    config_schema = TaskSchema(
        model={
            "channels": IntList([16, 32, 64], "output channels of each conv layer", low=1),
            "dropout": DropoutRate(0.0),
        },
    )

    def dataset(self, split: str) -> Dataset:
        if "splits" not in _CACHE:
            _CACHE["splits"] = digits_splits()
        if split not in _CACHE["splits"]:
            raise ValueError(f"unknown split {split!r}")
        return TensorDataset(*_CACHE["splits"][split])

    def collate(self, examples: Any, split: str) -> Any:
        return stack_batch(examples)

    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        return ConvNet(1, 8, m["channels"], 10, self.make_norm, float(m["dropout"]))
