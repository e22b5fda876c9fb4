"""Character-level language modelling with Transformer-XL (the paper's enwik8 column, §3.2).

Datasets: ``tiny_shakespeare`` (the CPU-scale stand-in; BPC per character) and ``enwik8`` under
``data.protocol`` ``raw`` (bytes, newlines kept; BPC per byte) or ``txl`` (the Transformer-XL
pipeline, newlines dropped; BPC per character) — see :mod:`.lm_data`.  The protocol is part of
:attr:`LMTask.test_metric_label`, so it is written next to every number.

**Memory during training.**  The reference trains on the split cut into ``batch_size`` contiguous
streams, read in order, and carries each step's memory into the next step.  The lab's trainer
shuffles examples (any order must give the same result, for exact resume and DDP), so the memory
cannot come from the previous optimizer step.  Instead each training example is a window of
``train_memory_segments`` preceding segments plus the segment to learn: the preceding segments
are run first without gradient, carrying memory from one to the next, and the memory they leave
feeds the trained segment.  The memory is therefore what the reference would have — the detached
hidden states of the preceding text — computed by the current parameters instead of those of one
step earlier, at the price of one gradient-free forward pass per warm-up segment.

**Evaluation** reads each split as ``data.eval_streams`` contiguous streams, segment by segment
(``model.eval_tgt_len``), carrying memory (``model.eval_mem_len``, ``model.eval_clamp_len``,
``model.eval_same_length``: the reference evaluates with 80 / 2100 / 820 / same_length), and
averages the cross-entropy over every predicted symbol.  BPC = nats / ln 2.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..data import DataFile, DatasetInfo, register_dataset, require_dataset
from ..schema import Bool, DropoutRate, Int, Str, TaskSchema
from ..task import Stats, Task, register_task, stats_to_floats
from .lm_data import (
    ENWIK8_PROTOCOLS,
    Corpus,
    EvalStreams,
    SegmentWindows,
    enwik8_corpus,
    load_tiny_shakespeare,
    read_enwik8_zip,
)
from .lm_model import Mems, TransformerXL

__all__ = ["LMTask", "TINY_SHAKESPEARE", "ENWIK8"]

TINY_SHAKESPEARE = register_dataset(
    DatasetInfo(
        name="tiny_shakespeare",
        subdir="tiny_shakespeare",
        description="Tiny Shakespeare (Karpathy, char-rnn), 1,115,394 characters",
        homepage="https://github.com/karpathy/char-rnn",
        files=(
            DataFile(
                name="input.txt",
                sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                urls=(
                    "https://raw.githubusercontent.com/karpathy/char-rnn/"
                    "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
                ),
            ),
        ),
    )
)

ENWIK8 = register_dataset(
    DatasetInfo(
        name="enwik8",
        subdir="enwik8",
        description="enwik8: the first 10^8 bytes of English Wikipedia (Hutter Prize)",
        homepage="http://mattmahoney.net/dc/textdata.html",
        files=(
            DataFile(
                name="enwik8.zip",  # 36,445,475 bytes
                sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
                urls=("http://mattmahoney.net/dc/enwik8.zip",),
            ),
        ),
    )
)

# Decoding enwik8 takes seconds: keep corpora per (dataset, directory, protocol) for the process.
_CORPORA: dict[tuple[str, str, str], Corpus] = {}


@register_task("lm")
class LMTask(Task):
    datasets = ("tiny_shakespeare", "enwik8")
    # Defaults: the paper preset (presets/lm/paper.yaml: Transformer-XL base on enwik8).
    config_schema = TaskSchema(
        data={
            "protocol": Str("txl", "enwik8: raw (bytes) or txl (newlines dropped); "
                            "tiny_shakespeare: chars", choices=("chars", *ENWIK8_PROTOCOLS)),
            "eval_streams": Int(10, "the split is read as this many contiguous streams", low=1),
            "download": Bool(False, "fetch missing files into the data root (sha256-checked)"),
        },
        model={
            "n_layer": Int(12, low=1),
            "d_model": Int(512, low=1),
            "n_head": Int(8, low=1),
            "d_head": Int(64, low=1),
            "d_inner": Int(2048, low=1),
            "dropout": DropoutRate(0.1),
            "dropatt": DropoutRate(0.0),
            "pre_norm": Bool(False, "the reference is post-norm"),
            "tie_weight": Bool(True),
            "tgt_len": Int(512, low=1),
            "mem_len": Int(512, low=0),
            "clamp_len": Int(-1, "-1: no clamping", low=-1),
            "same_length": Bool(False),
            "train_memory_segments": Int(1, "segments run without gradient to fill the memory",
                                         low=0),
            "eval_tgt_len": Int(80, low=1),
            "eval_mem_len": Int(2100, low=0),
            "eval_clamp_len": Int(820, "-1: no clamping", low=-1),
            "eval_same_length": Bool(True),
        },
    )
    valid_metric = "bpc"
    valid_mode = "min"
    test_metric = "bpc"
    test_metric_label = "BPC"

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        m = cfg["model"]
        self.tgt_len = self._positive_int(m, "tgt_len")
        self.mem_len = int(m["mem_len"])
        self.memory_segments = int(m["train_memory_segments"])
        if self.memory_segments < 0:
            raise ValueError(
                f"model.train_memory_segments must be >= 0, got {self.memory_segments}"
            )
        self.eval_lengths = {
            "mem_len": int(m["eval_mem_len"]),
            "clamp_len": int(m["eval_clamp_len"]),
            "same_length": bool(m["eval_same_length"]),
        }
        self.eval_tgt_len = self._positive_int(m, "eval_tgt_len")
        protocol = cfg["data"]["protocol"]
        if self.dataset_name == "enwik8" and protocol not in ENWIK8_PROTOCOLS:
            raise ValueError(
                f"data.protocol must be one of {', '.join(ENWIK8_PROTOCOLS)} for enwik8, "
                f"got {protocol!r}"
            )
        self._corpus: Corpus | None = None

    @staticmethod
    def _positive_int(section: Mapping[str, Any], key: str, default: int | None = None) -> int:
        value = section.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model.{key} must be a positive int, got {value!r}")
        return value

    # --- data -----------------------------------------------------------------------------------
    def corpus(self) -> Corpus:
        """The encoded splits; also sets the metric label, which names the protocol."""
        if self._corpus is None:
            download = bool(self.cfg["data"]["download"])
            directory = require_dataset(self.dataset_name, self.data_dir, download=download)
            protocol = str(self.cfg["data"]["protocol"])
            key = (self.dataset_name, str(directory.resolve()), protocol)
            if key not in _CORPORA:
                if self.dataset_name == "tiny_shakespeare":
                    _CORPORA[key] = load_tiny_shakespeare(directory / "input.txt")
                else:
                    _CORPORA[key] = enwik8_corpus(read_enwik8_zip(directory / "enwik8.zip"),
                                                  protocol)
            self._corpus = _CORPORA[key]
            self.test_metric_label = f"BPC per {self._corpus.unit} [{self._corpus.protocol}]"
            print(f"lm: {self.test_metric_label}", file=sys.stderr)
        return self._corpus

    def dataset(self, split: str) -> Dataset:
        ids = self.corpus().split(split)
        if split == "train":
            return SegmentWindows(ids, self.tgt_len, self.memory_segments * self.tgt_len)
        return EvalStreams(ids, int(self.cfg["data"]["eval_streams"]))

    def collate(self, examples: Any) -> Tensor:
        if isinstance(examples, Tensor):  # from __getitems__: already one batch
            return examples
        return torch.stack(list(examples))

    def batch_size(self, batch: Any) -> int:
        return int(batch.shape[0])

    # --- model ----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        return TransformerXL(
            vocab_size=self.corpus().vocab_size,
            n_layer=self._positive_int(m, "n_layer"),
            d_model=self._positive_int(m, "d_model"),
            n_head=self._positive_int(m, "n_head"),
            d_head=self._positive_int(m, "d_head"),
            d_inner=self._positive_int(m, "d_inner"),
            dropout=float(m["dropout"]),
            dropatt=float(m["dropatt"]),
            make_norm=self.make_norm,
            pre_norm=bool(m["pre_norm"]),
            mem_len=self.mem_len,
            clamp_len=int(m["clamp_len"]),
            same_length=bool(m["same_length"]),
            tie_weight=bool(m["tie_weight"]),
        )

    # --- criterion ------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, Stats]:
        """Warm the memory up on the window's leading segments, then learn its last segment."""
        context = batch.shape[1] - 1 - self.tgt_len
        mems: Mems | None = None
        if context > 0:
            with torch.no_grad():
                for start in range(0, context, self.tgt_len):
                    _, mems = model(batch[:, start : min(start + self.tgt_len, context)], mems)
        inputs = batch[:, context : context + self.tgt_len]
        targets = batch[:, context + 1 :]
        logits, _ = model(inputs, mems)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        count = targets.numel()
        return nll, {"nll_sum": nll.detach().double() * count, "symbols": float(count)}

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        symbols = stats.get("symbols", 0.0)
        if symbols <= 0:
            raise ValueError("no symbols were evaluated (empty split?)")
        nats = stats["nll_sum"] / symbols
        return {"loss": nats, "bpc": nats / math.log(2), "symbols": symbols}

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        reduce: Callable[[Stats], Stats],
        autocast: Callable[[], Any],
    ) -> dict[str, float]:
        """Read every batch of streams segment by segment, carrying memory between segments."""
        total: Stats = {"nll_sum": 0.0, "symbols": 0.0}
        with torch.no_grad():
            for streams in batches:
                mems: Mems | None = None
                length = streams.shape[1]
                for start in range(0, length - 1, self.eval_tgt_len):
                    end = min(start + self.eval_tgt_len, length - 1)
                    with autocast():
                        logits, mems = model(streams[:, start:end], mems, **self.eval_lengths)
                    targets = streams[:, start + 1 : end + 1]
                    total["nll_sum"] += F.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                        reduction="sum").double()
                    total["symbols"] += targets.numel()
        return self.metrics(reduce(stats_to_floats(total)))
