"""The ``textcls`` task: RT / SST-5 / SST-2 (:mod:`.data`) with the encoder of :mod:`.model`,
accuracy on the best-validation epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...config import ConfigError
from ...data import require_dataset
from ...schema import Bool, DropoutRate, Int, Sizes, Str, TaskSchema
from ...task import ClassificationTask, TensorDataset, register_task
from .data import (
    NUM_CLASSES,
    NUM_FOLDS,
    PAD_ID,
    PROTOCOLS,
    SST_STEM,
    Example,
    Vocabulary,
    cv_split,
    encode_batch,
    read_rt,
    read_sst,
    stratified_split,
)
from .model import TextTransformer

__all__ = ["TextClassificationTask"]

_CACHE: dict[tuple[Any, ...], tuple[Vocabulary, dict[str, tuple[Tensor, Tensor]]]] = {}
@register_task("textcls")
class TextClassificationTask(ClassificationTask):
    """RT / SST-5 / SST-2 sentence classification; accuracy (%) on the best-validation epoch."""

    datasets = ("rt", "sst5", "sst2")
    # Defaults: the paper preset (presets/textcls/paper.yaml, docs/tasks/textcls.md).
    config_schema = TaskSchema(
        data={
            "protocol": Str("split", "split (RT: seeded 80/10/10; SST: official) | cv10 (RT)",
                            choices=PROTOCOLS),
            "split_seed": Int(0, "the RT split / folds", low=0, high=2**32 - 1),
            "cv_fold": Int(0, "with protocol cv10: the test fold", low=0, high=NUM_FOLDS - 1),
            "lowercase": Bool(True),
            "min_freq": Int(1, "vocabulary: training words seen at least this often", low=1),
            "download": Bool(False, "fetch missing files into the data root (sha256-checked)"),
        },
        model={
            "pre_norm": Bool(True),
            "pooling": Str("mean", choices=("mean", "cls")),
            **Sizes(d_model=256, num_heads=4, d_ff=1024, num_layers=4, max_len=128),
            "dropout": DropoutRate(0.3),
            "attention_dropout": DropoutRate(0.1),
            "activation_dropout": DropoutRate(0.1),
        },
    )

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        d = cfg["data"]
        self.protocol = d["protocol"]
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"data.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.protocol == "cv10" and self.dataset_name != "rt":
            raise ConfigError(
                f"data.protocol=cv10 is for rt only; {self.dataset_name} has an official split "
                f"(use data.protocol=split)"
            )
        self.split_seed = d["split_seed"]
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool):
            raise ConfigError(f"data.split_seed must be an int, got {self.split_seed!r}")
        self.cv_fold = d["cv_fold"]
        self.num_classes = NUM_CLASSES[self.dataset_name]
        self.add_cls = cfg["model"]["pooling"] == "cls"

    def _examples(self) -> dict[str, list[Example]]:
        """The raw ``(text, label)`` examples of each split under the configured protocol."""
        directory = require_dataset(
            self.dataset_name, self.data_dir, download=bool(self.cfg["data"]["download"])
        )
        if self.dataset_name == "rt":
            examples = read_rt(directory)
            labels = [label for _, label in examples]
            if self.protocol == "cv10":
                parts = cv_split(labels, self.split_seed, self.cv_fold)
            else:
                parts = stratified_split(labels, self.split_seed)
            return {split: [examples[i] for i in idx] for split, idx in parts.items()}
        stem = SST_STEM[self.dataset_name]
        return {
            split: read_sst(directory / f"{stem}.{suffix}", self.num_classes)
            for split, suffix in (("train", "train"), ("valid", "dev"), ("test", "test"))
        }

    def _encoded(self) -> tuple[Vocabulary, dict[str, tuple[Tensor, Tensor]]]:
        d, m = self.cfg["data"], self.cfg["model"]
        lowercase = bool(d["lowercase"])
        min_freq = d["min_freq"]
        max_len = m["max_len"]
        key = (
            str(self.data_dir),
            self.dataset_name,
            self.protocol,
            self.split_seed,
            self.cv_fold if self.protocol == "cv10" else None,
            lowercase,
            min_freq,
            max_len,
            self.add_cls,
        )
        if key not in _CACHE:
            examples = self._examples()
            vocab = Vocabulary.build(
                [t for t, _ in examples["train"]], lowercase=lowercase, min_freq=min_freq
            )
            tensors = {
                split: (
                    encode_batch(vocab, [t for t, _ in items], max_len, self.add_cls),
                    torch.tensor([label for _, label in items], dtype=torch.long),
                )
                for split, items in examples.items()
            }
            _CACHE[key] = (vocab, tensors)
        return _CACHE[key]

    @property
    def vocabulary(self) -> Vocabulary:
        return self._encoded()[0]

    def dataset(self, split: str) -> Dataset:
        tensors = self._encoded()[1]
        if split not in tensors:
            raise ValueError(f"unknown split {split!r}; choose train, valid or test")
        return TensorDataset(*tensors[split])

    def collate(self, examples: Any, split: str) -> Any:
        if not isinstance(examples, tuple):  # individual examples (no __getitems__ on the path)
            examples = tuple(torch.stack(column) for column in zip(*examples, strict=True))
        ids, labels = examples
        # Trim the padding columns the batch does not use: sentences average ~20 tokens, max_len
        # is far longer, and attention cost grows with the padded length.
        length = max(int(ids.ne(PAD_ID).sum(1).max()), 1)
        return ids[:, :length].contiguous(), labels

    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        return TextTransformer(
            len(self.vocabulary),
            self.num_classes,
            self.make_norm,
            d_model=m["d_model"],
            num_heads=m["num_heads"],
            d_ff=m["d_ff"],
            num_layers=m["num_layers"],
            max_len=m["max_len"],
            dropout=float(m["dropout"]),
            attention_dropout=float(m["attention_dropout"]),
            activation_dropout=float(m["activation_dropout"]),
            pre_norm=m["pre_norm"],
            pooling=m["pooling"],
        )
