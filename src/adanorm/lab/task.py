"""The Task interface: everything that differs between experiments, and nothing else.

A task (in the spirit of fairseq's ``FairseqTask``) owns

* the data: :meth:`Task.dataset` builds the ``train``/``valid``/``test`` splits of the dataset named
  by ``cfg["data"]["name"]`` (a task may serve several datasets, e.g. text classification on
  ``rt`` and ``sst5``), and :meth:`Task.collate` turns a list of examples of a split into a batch.
  ``data.batch_size`` is the number of examples per micro-step over all processes for every task
  whose examples are single examples; a task whose examples are already batches (translation's
  token batches, :attr:`Task.examples_are_batches`) draws one per process and refuses the key;
* the model: :meth:`Task.build_model`, whose norms come *only* from :func:`adanorm.make_norm`
  with ``cfg["model"]["norm"]`` and ``cfg["model"]["norm_kwargs"]`` (use :meth:`Task.make_norm`);
* the criterion: :meth:`Task.loss` returns the loss to back-propagate for a batch, plus additive
  statistics (sums and counts) from which metrics are computed.  A statistic computed on the
  device stays there as a detached 0-dim tensor (e.g. ``loss.detach().double() * n``) and counts
  known on the host are Python numbers: converting a device value with ``float()`` in every step
  would wait for the accelerator each micro-step;
* the metrics: :meth:`Task.metrics` turns summed statistics into metrics.  The class attributes
  :attr:`Task.valid_metric` / :attr:`Task.valid_mode` choose the best checkpoint and drive early
  stopping; :attr:`Task.test_metric` is the number reported in tables.

Statistics are *sums* so that the generic :class:`~adanorm.lab.trainer.Trainer` can add them over
batches, over gradient-accumulation micro-batches and over DDP processes, and get exact metrics.
Every task evaluates through the one loop of :meth:`Task.evaluate`; what a task adds to the loss's
statistics (decoding, BLEU's n-gram counts, attachment scores, memory carried along a stream) goes
in :meth:`Task.eval_batch_stats`, which is told the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import adanorm

__all__ = [
    "Task",
    "Stats",
    "ChanceLevel",
    "majority_class_accuracy",
    "register_task",
    "get_task",
    "available_tasks",
    "ClassificationTask",
    "TensorDataset",
    "stack_batch",
    "stats_to_floats",
    "add_stats",
    "cross_entropy_stats",
]

#: Additive statistics: Python numbers, or detached 0-dim tensors still on the device.
Stats = dict[str, Any]
Split = Literal["train", "valid", "test"]

_TASKS: dict[str, type[Task]] = {}


def stats_to_floats(stats: Mapping[str, Any]) -> dict[str, float]:
    """``stats`` as Python floats, in their order, with one host synchronization for all the
    device tensors among them (via float64: a float32 value converts exactly as by ``float()``)."""
    tensors = {k: v for k, v in stats.items() if isinstance(v, Tensor)}
    host = {}
    if tensors:
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in tensors.values()])
        host = dict(zip(tensors, stacked.tolist(), strict=True))
    return {k: host[k] if k in host else float(v) for k, v in stats.items()}


def add_stats(total: Stats, stats: Mapping[str, Any]) -> None:
    """``total += stats`` key by key, keeping device values on the device (in float64: the sums
    are then the ones Python floats would give, bit for bit)."""
    for key, value in stats.items():
        if isinstance(value, Tensor):
            value = value.detach().to(torch.float64)
        total[key] = total.get(key, 0.0) + value


@dataclass(frozen=True)
class ChanceLevel:
    """The validation metric of a predictor that ignores its input, fitted on the train split.

    A run whose best validation metric is no better than this learned nothing from its inputs
    (an LM stuck at the train split's character frequencies, a classifier that always answers the
    majority class), however finite its loss.  ``predictor`` says what was fitted, for the tables.
    """

    metric: str
    value: float
    predictor: str


def majority_class_accuracy(train_labels: Tensor, valid_labels: Tensor) -> ChanceLevel:
    """Accuracy (%) on ``valid_labels`` of always answering the most frequent train label (the
    smallest such label on a tie)."""
    if train_labels.numel() == 0 or valid_labels.numel() == 0:
        raise ValueError("majority_class_accuracy needs non-empty train and valid labels")
    counts = torch.bincount(train_labels.reshape(-1).long())
    majority = int(counts.argmax())
    accuracy = 100.0 * float((valid_labels == majority).double().mean())
    return ChanceLevel("acc", accuracy, f"always the majority train class ({majority})")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: ``@register_task("mnist") class MnistTask(Task): ...``."""

    def decorator(cls: type[Task]) -> type[Task]:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"a task named {name!r} is already registered ({_TASKS[name]})")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def _load_builtin_tasks() -> None:
    from . import tasks  # noqa: F401  (importing registers the built-in tasks)


def available_tasks() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    _load_builtin_tasks()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


class Task:
    """Base class of all tasks; see the module docstring."""

    name: ClassVar[str] = ""
    #: The datasets this task can serve (values of ``cfg["data"]["name"]``).
    datasets: ClassVar[tuple[str, ...]] = ()
    #: The validation metric that selects the best checkpoint, and whether higher is better.
    valid_metric: ClassVar[str] = "loss"
    valid_mode: ClassVar[Literal["min", "max"]] = "min"
    #: The test metric reported in tables and compared with the paper.
    test_metric: ClassVar[str] = "loss"
    #: How the test metric is labelled in tables ("accuracy (%)", "BLEU", "BPC").
    test_metric_label: ClassVar[str] = "loss"
    #: Whether the trainer draws the training examples in a shuffled order (a function of
    #: ``(seed, epoch)``).  A task that reads them in index order and carries state from one
    #: update to the next (the LM's stream mode) sets it False and keeps that state in
    #: :meth:`state_dict`, which goes into every checkpoint.
    shuffle_train: bool = True
    #: Whether each dataset example is already a batch (translation's token batches): the trainer
    #: then draws one example per process and micro-step, and ``data.batch_size`` /
    #: ``data.eval_batch_size`` do not apply (the task's schema refuses them).
    examples_are_batches: ClassVar[bool] = False

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        name = cfg["data"]["name"]
        if self.datasets and name not in self.datasets:
            raise ValueError(
                f"task {self.name!r} has no dataset {name!r}; choose data.name from "
                f"{', '.join(self.datasets)}"
            )
        self.dataset_name: str = name

    # --- data -----------------------------------------------------------------------------------
    def dataset(self, split: Split) -> Dataset:
        raise NotImplementedError

    def collate(self, examples: Any, split: Split) -> Any:
        """Turn what ``dataset(split)[...]`` (or its ``__getitems__``) returned into a batch."""
        return torch.utils.data.default_collate(examples)

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch`` (used to weight the training loss for logging)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])

    # --- model and criterion --------------------------------------------------------------------
    def make_norm(self, normalized_shape: int | tuple[int, ...]) -> nn.Module:
        """The configured norm over ``normalized_shape``: the only way models get their norms."""
        model_cfg = self.cfg["model"]
        return adanorm.make_norm(
            model_cfg["norm"], normalized_shape, **dict(model_cfg.get("norm_kwargs") or {})
        )

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Stats]:
        """Return ``(loss, stats)``: ``loss`` is what to back-propagate (a mean over the batch) and
        ``stats`` holds additive sums, e.g. ``{"loss_sum": ..., "correct": ..., "n": ...}``:
        device values as detached 0-dim tensors (never ``float(tensor)``, which waits for the
        device), host counts as Python numbers."""
        raise NotImplementedError

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        """Metrics from summed ``stats``; must contain ``loss`` and the declared metrics."""
        raise NotImplementedError

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        reduce: Callable[[Stats], Stats],
        autocast: Callable[[], Any],
        split: Split,
    ) -> dict[str, float]:
        """Metrics of ``model`` over the ``split`` batches of this process's shard: the sum of
        :meth:`eval_batch_stats` over the batches, summed over processes by ``reduce``."""
        total: Stats = {}
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    stats = self.eval_batch_stats(model, batch, split)
                add_stats(total, stats)
        return self.metrics(reduce(stats_to_floats(total)))

    def eval_batch_stats(self, model: nn.Module, batch: Any, split: Split) -> Stats:
        """Additive statistics of one evaluation batch of ``split``: the loss's by default.
        Every process must return the same keys (they are summed over processes), also for a
        batch that contributes nothing to some of them."""
        return self.loss(model, batch)[1]

    def chance_level(self) -> ChanceLevel | None:
        """The validation metric (:attr:`valid_metric`) of the best predictor that ignores its
        input, fitted on the train split of this config's data; ``None`` where the task defines
        none.  Reports flag every run that does not beat it.  May raise
        :class:`~adanorm.lab.data.DataMissingError` when the data is not there."""
        return None

    # --- training state carried across updates ------------------------------------------------
    def begin_train_epoch(self, epoch: int, start_batch: int) -> None:
        """Called before the trainer draws micro-batch ``start_batch`` of epoch ``epoch``: 0 at the
        start of an epoch, more when a run resumes inside one."""

    def state_dict(self) -> dict[str, Any]:
        """Training state this process carries across updates (plain data and tensors), saved in
        every checkpoint and handed back to :meth:`load_state_dict` on resume.  Stateless tasks
        return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"task {self.name!r} keeps no training state, but the checkpoint holds "
                f"{sorted(state)}: it was written by another task or version"
            )

    # --- outputs --------------------------------------------------------------------------------
    def results_extra(self) -> dict[str, Any]:
        """Task-specific entries added to ``results.json`` (e.g. a BLEU signature)."""
        return {}

    def write_artifacts(self, run_dir: Path) -> None:
        """Write task outputs (e.g. translations) into ``run_dir`` after the final test."""


class TensorDataset(Dataset):
    """In-memory tensors indexed along dim 0, fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader gather a batch with one indexing operation instead of
    stacking examples one by one, which matters on 2 CPU cores.
    """

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("TensorDataset needs tensors with the same first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def stack_batch(examples: Any) -> Any:
    """Collate for :class:`TensorDataset`: its ``__getitems__`` already returns a batch."""
    return examples


def cross_entropy_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Stats]:
    """Mean cross-entropy of ``logits`` (computed in float32) against ``labels``, with the sums
    accuracy-style metrics need: ``loss_sum``, ``correct`` (argmax hits) and ``n``."""
    logits = logits.float()
    loss = nn.functional.cross_entropy(logits, labels)
    n = labels.shape[0]
    stats = {
        "loss_sum": loss.detach().double() * n,
        "correct": (logits.detach().argmax(-1) == labels).sum().double(),
        "n": float(n),
    }
    return loss, stats


class ClassificationTask(Task):
    """Cross-entropy classification with accuracy (in %) as the valid and test metric.

    Subclasses implement :meth:`dataset` (yielding ``(inputs, labels)``) and :meth:`build_model`.
    """

    valid_metric = "acc"
    valid_mode = "max"
    test_metric = "acc"
    test_metric_label = "accuracy (%)"

    def collate(self, examples: Any, split: Split) -> Any:
        if isinstance(examples, tuple):  # from TensorDataset.__getitems__
            return examples
        return super().collate(examples, split)

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Stats]:
        inputs, labels = batch
        return cross_entropy_stats(model(inputs), labels)

    def chance_level(self) -> ChanceLevel | None:
        """Always answering the train split's majority class."""
        train, valid = self.dataset("train"), self.dataset("valid")
        if not isinstance(train, TensorDataset) or not isinstance(valid, TensorDataset):
            return None
        return majority_class_accuracy(train.tensors[-1], valid.tensors[-1])

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        n = stats.get("n", 0.0)
        if n <= 0:
            raise ValueError("no examples were evaluated (empty split?)")
        return {"loss": stats["loss_sum"] / n, "acc": 100.0 * stats["correct"] / n}
