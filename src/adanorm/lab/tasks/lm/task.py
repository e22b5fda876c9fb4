"""Character-level language modelling with Transformer-XL (the paper's enwik8 column, §3.2).

Datasets: ``tiny_shakespeare`` (the CPU-scale stand-in; BPC per character) and ``enwik8`` under
``data.protocol`` ``raw`` (bytes, newlines kept; BPC per byte) or ``txl`` (the Transformer-XL
pipeline, newlines dropped; BPC per character) — see :mod:`.data`.  The protocol is part of
:attr:`LMTask.test_metric_label`, so it is written next to every number.

**Memory during training** (``data.train_mode``):

* ``stream`` (the presets' default; the reference's loop): the train split is cut into
  ``data.batch_size`` contiguous streams (:class:`~.data.TrainStreams`), the trainer reads them
  in order (:attr:`LMTask.shuffle_train` is False), each DDP process owning its slice of the
  streams, and the detached memory that segment ``b`` of a stream leaves is the memory of its
  segment ``b + 1``, one update later (with ``optim.accum_steps`` > 1, one micro-batch later).
  The memory is reset at the start of every epoch, as the reference's ``train()``.  The memory and
  the stream position are :meth:`LMTask.state_dict`, saved in every checkpoint for exact resume.
* ``warmup``: each training example is a window of ``model.train_memory_segments`` preceding
  segments plus the segment to learn, in the trainer's shuffled order; the preceding segments are
  run first without gradient, carrying memory, and the memory they leave feeds the trained
  segment (memory from the current parameters, one segment deep; one extra forward pass per
  warm-up segment).

**Evaluation** reads each split as ``data.eval_streams`` contiguous streams, segment by segment
(``model.eval_tgt_len``), carrying memory (``model.eval_mem_len``, ``model.eval_clamp_len``,
``model.eval_same_length``: the reference evaluates with 80 / 2100 / 820 / same_length), and
averages the cross-entropy over every predicted symbol.  BPC = nats / ln 2.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ...data import require_dataset
from ...schema import Bool, DropoutRate, Int, Sizes, Str, TaskSchema
from ...task import ChanceLevel, Stats, Task, register_task
from .data import (
    ENWIK8_PROTOCOLS,
    Corpus,
    EvalStreams,
    SegmentWindows,
    TrainStreams,
    enwik8_corpus,
    load_tiny_shakespeare,
    read_enwik8_zip,
)
from .model import Mems, TransformerXL

__all__ = ["LMTask", "TRAIN_MODES"]

#: ``data.train_mode``: memory carried along ordered streams, or rebuilt per shuffled window.
TRAIN_MODES = ("stream", "warmup")

# Decoding enwik8 takes seconds: keep corpora per (dataset, directory, protocol) for the process.
_CORPORA: dict[tuple[str, str, str], Corpus] = {}


@register_task("lm")
class LMTask(Task):
    datasets = ("tiny_shakespeare", "enwik8")
    valid_metric = "bpc"
    valid_mode = "min"
    test_metric = "bpc"
    test_metric_label = "BPC"

    # Defaults: the paper preset (presets/lm/paper.yaml: Transformer-XL base on enwik8).
    config_schema = TaskSchema(
        data={
            "protocol": Str("txl", "enwik8: raw (bytes) or txl (newlines dropped); "
                            "tiny_shakespeare: chars", choices=("chars", *ENWIK8_PROTOCOLS)),
            "eval_streams": Int(10, "the split is read as this many contiguous streams", low=1),
            "train_mode": Str("stream", "stream: memory carried across updates along ordered "
                              "streams (the reference); warmup: rebuilt per shuffled window",
                              choices=TRAIN_MODES),
            "download": Bool(False, "fetch missing files into the data root (sha256-checked)"),
        },
        model={
            **Sizes(n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048),
            "dropout": DropoutRate(0.1),
            "dropatt": DropoutRate(0.0),
            "pre_norm": Bool(False, "the reference is post-norm"),
            "tie_weight": Bool(True),
            "tgt_len": Int(512, low=1),
            "mem_len": Int(512, low=0),
            "clamp_len": Int(-1, "-1: no clamping", low=-1),
            "same_length": Bool(False),
            "train_memory_segments": Int(None, "warmup mode: segments run without gradient to "
                                         "fill the memory (null: ceil(mem_len / tgt_len))",
                                         low=0, nullable=True),
            "eval_tgt_len": Int(80, low=1),
            "eval_mem_len": Int(2100, low=0),
            "eval_clamp_len": Int(820, "-1: no clamping", low=-1),
            "eval_same_length": Bool(True),
        },
    )

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        m = cfg["model"]
        self.tgt_len = self._positive_int(m, "tgt_len")
        self.mem_len = int(m["mem_len"])
        self.train_mode = cfg["data"]["train_mode"]
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(
                f"data.train_mode must be one of {', '.join(TRAIN_MODES)}, got {self.train_mode!r}"
            )
        segments = m["train_memory_segments"]
        if self.train_mode == "stream":
            if segments is not None:
                raise ValueError(
                    f"model.train_memory_segments={segments!r} applies to data.train_mode=warmup "
                    f"only; the stream mode carries memory across updates: set it to null or "
                    f"use data.train_mode=warmup"
                )
            self.memory_segments = 0
        elif segments is None:
            self.memory_segments = math.ceil(self.mem_len / self.tgt_len) if self.mem_len else 0
        elif isinstance(segments, int) and not isinstance(segments, bool) and segments >= 0:
            self.memory_segments = segments
        else:
            raise ValueError(f"model.train_memory_segments must be an int >= 0, got {segments!r}")
        # Stream mode: the trainer reads the streams in order, and the memory of this process's
        # streams (one tensor per layer) is carried from each training segment to the next.
        self.shuffle_train = self.train_mode != "stream"
        self._stream_mems: Mems = []
        self._stream_position: tuple[int, int] | None = None  # (epoch, next micro-batch)
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
        if split == "train" and self.train_mode == "stream":
            return TrainStreams(ids, int(self.cfg["data"]["batch_size"]), self.tgt_len)
        if split == "train":
            return SegmentWindows(ids, self.tgt_len, self.memory_segments * self.tgt_len)
        return EvalStreams(ids, int(self.cfg["data"]["eval_streams"]))

    def collate(self, examples: Any, split: str) -> Tensor:
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
        """Learn one training segment per row: with the memory carried from the same stream's
        previous segment (stream mode), or after warming the memory up on the window's leading
        segments (warmup mode)."""
        if self.train_mode == "stream":
            return self._stream_loss(model, batch)
        context = batch.shape[1] - 1 - self.tgt_len
        mems: Mems | None = None
        if context > 0:
            with torch.no_grad():
                for start in range(0, context, self.tgt_len):
                    _, mems = model(batch[:, start : min(start + self.tgt_len, context)], mems)
        inputs = batch[:, context : context + self.tgt_len]
        targets = batch[:, context + 1 :]
        logits, _ = model(inputs, mems)
        return self._segment_loss(logits, targets)

    @staticmethod
    def _segment_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Stats]:
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        count = targets.numel()
        return nll, {"nll_sum": nll.detach().double() * count, "symbols": float(count)}

    def _stream_loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, Stats]:
        if self._stream_position is None:
            raise RuntimeError("lm stream mode: begin_train_epoch was not called before training")
        mems = [m.to(batch.device) for m in self._stream_mems]
        if mems and mems[0].shape[0] != batch.shape[0]:
            raise RuntimeError(
                f"lm stream mode: a batch of {batch.shape[0]} streams but memory for "
                f"{mems[0].shape[0]}; the streams must keep their rows from update to update"
            )
        logits, self._stream_mems = model(batch[:, :-1], mems)
        epoch, position = self._stream_position
        self._stream_position = (epoch, position + 1)
        return self._segment_loss(logits, batch[:, 1:])

    # --- training state: the carried memory ---------------------------------------------------
    def begin_train_epoch(self, epoch: int, start_batch: int) -> None:
        """Stream mode: a new epoch starts with empty memory (as the reference's ``train()``);
        a resumed one continues with the memory its checkpoint saved."""
        if self.train_mode != "stream":
            return
        if start_batch == 0:
            self._stream_mems, self._stream_position = [], (epoch, 0)
        elif self._stream_position != (epoch, start_batch):
            raise RuntimeError(
                f"lm stream mode: resuming at epoch {epoch}, micro-batch {start_batch}, but the "
                f"checkpoint's memory is for {self._stream_position} (epoch, micro-batch); "
                f"a checkpoint from a warmup-mode or older run cannot resume in stream mode: "
                f"restart it, or resume with data.train_mode=warmup"
            )

    def state_dict(self) -> dict[str, Any]:
        if self.train_mode != "stream" or self._stream_position is None:
            return {}
        epoch, position = self._stream_position
        return {"epoch": epoch, "micro_batch": position,
                "mems": [m.detach().to("cpu").clone() for m in self._stream_mems]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self._stream_mems, self._stream_position = [], None
            return
        if self.train_mode != "stream":
            raise ValueError(
                "the checkpoint holds stream-mode memory but data.train_mode is "
                f"{self.train_mode!r}: resume with data.train_mode=stream"
            )
        self._stream_position = (int(state["epoch"]), int(state["micro_batch"]))
        self._stream_mems = list(state["mems"])

    def chance_level(self) -> ChanceLevel:
        """The train split's symbol frequencies (add-one smoothed, so that a symbol unseen in
        training costs a finite amount) as the prediction for every validation symbol that
        :meth:`eval_batch_stats` scores (each eval stream's symbols after its first)."""
        corpus = self.corpus()
        counts = torch.bincount(corpus.split("train").reshape(-1).long(),
                                minlength=corpus.vocab_size).double() + 1.0
        log2_prob = torch.log2(counts / counts.sum())
        streams = EvalStreams(corpus.split("valid"), int(self.cfg["data"]["eval_streams"]))
        bpc = -float(log2_prob[streams.streams[:, 1:].long()].mean())
        return ChanceLevel("bpc", bpc, "unigram of the train split (add-one smoothed)")

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        symbols = stats.get("symbols", 0.0)
        if symbols <= 0:
            raise ValueError("no symbols were evaluated (empty split?)")
        nats = stats["nll_sum"] / symbols
        return {"loss": nats, "bpc": nats / math.log(2), "symbols": symbols}

    # --- evaluation -----------------------------------------------------------------------------
    def eval_batch_stats(self, model: nn.Module, streams: Tensor, split: str) -> Stats:
        """Read a batch of streams segment by segment, carrying memory between segments."""
        stats: Stats = {"nll_sum": 0.0, "symbols": 0.0}
        mems: Mems | None = None
        length = streams.shape[1]
        for start in range(0, length - 1, self.eval_tgt_len):
            end = min(start + self.eval_tgt_len, length - 1)
            logits, mems = model(streams[:, start:end], mems, **self.eval_lengths)
            targets = streams[:, start + 1 : end + 1]
            stats["nll_sum"] += F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                reduction="sum").double()
            stats["symbols"] += targets.numel()
        return stats
