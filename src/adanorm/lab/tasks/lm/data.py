"""Character/byte corpora for language modelling: Tiny Shakespeare and enwik8, split and encoded.

enwik8 comes in two protocols (``docs/tasks/lm.md``), and every number says which:

* ``raw``: the bytes as they are, newlines kept, a 256-symbol vocabulary (x-transformers style);
  BPC is per *byte*.
* ``txl``: the Transformer-XL pipeline — ``prep_enwik8.py`` writes each byte as an integer token
  and a literal line break for byte 10, and ``data_utils.py`` then reads the files line by line,
  so the newline bytes vanish from the stream; the vocabulary is every byte value present in the
  three splits (204 on the real file). BPC is per character of that newline-free stream.

Both split enwik8 into the first 90M, next 5M and last 5M bytes (``prep_enwik8.py``'s
``data[:-10M]``, ``data[-10M:-5M]``, ``data[-5M:]``).

Tiny Shakespeare is split 90/5/5 by character position; its vocabulary is the 65 characters of
the whole file (as the reference builds the enwik8 vocabulary from all three splits).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...data import ChecksumError, DataFile, DatasetInfo, register_dataset

__all__ = [
    "TINY_SHAKESPEARE",
    "ENWIK8",
    "Corpus",
    "ENWIK8_PROTOCOLS",
    "ENWIK8_SPLIT",
    "ENWIK8_MEMBER_SHA256",
    "load_tiny_shakespeare",
    "read_enwik8_zip",
    "enwik8_corpus",
    "SegmentWindows",
    "TrainStreams",
    "EvalStreams",
]

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

ENWIK8_PROTOCOLS = ("raw", "txl")
#: Bytes in train, valid and test (the standard 90M / 5M / 5M split of the 10^8-byte file).
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
#: sha256 of the ``enwik8`` member of ``enwik8.zip`` (md5 a1fa5ffddb56f4953e226637dabbb36a as
#: published with the Hutter Prize).
ENWIK8_MEMBER_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
NEWLINE = 10


@dataclass(frozen=True)
class Corpus:
    """Encoded splits (uint8 ids, converted to int64 a batch at a time) and what a symbol is."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int
    unit: str  # what one BPC denominator symbol is: "character" or "byte"
    protocol: str  # human-readable description printed with every number

    def split(self, name: str) -> Tensor:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, valid or test")
        return getattr(self, name)


def _fractions_split(ids: Tensor, fractions: tuple[float, float, float]) -> tuple[Tensor, ...]:
    n = ids.numel()
    n_train = int(n * fractions[0])
    n_valid = int(n * fractions[1])
    return ids[:n_train], ids[n_train : n_train + n_valid], ids[n_train + n_valid :]


def load_tiny_shakespeare(path: Path) -> Corpus:
    """Tiny Shakespeare as character ids (sorted 65-character vocabulary), split 90/5/5."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.uint8)
    train, valid, test = _fractions_split(ids, (0.90, 0.05, 0.05))
    return Corpus(train, valid, test, len(chars), "character",
                  "tiny_shakespeare characters, 90/5/5 split")


def read_enwik8_zip(zip_path: Path, *, member_sha256: str | None = ENWIK8_MEMBER_SHA256) -> bytes:
    """The ``enwik8`` member of ``zip_path``; refuse it if its sha256 is not ``member_sha256``.

    The lab's registry already checked the zip's own sha256; the member check also catches a
    re-packed archive whose payload differs.
    """
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        if "enwik8" not in names:
            raise ValueError(f"{zip_path}: no member named 'enwik8' (members: {names[:5]})")
        data = archive.read("enwik8")
    if member_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != member_sha256:
            raise ChecksumError(
                f"{zip_path}: the enwik8 member has sha256 {actual}, expected {member_sha256}; "
                f"the archive is not the Hutter Prize enwik8.zip"
            )
    return data


def enwik8_corpus(
    data: bytes, protocol: str, split_sizes: tuple[int, int, int] = ENWIK8_SPLIT
) -> Corpus:
    """Split enwik8's bytes into train/valid/test and encode them under ``protocol``."""
    if protocol not in ENWIK8_PROTOCOLS:
        raise ValueError(
            f"unknown enwik8 protocol {protocol!r}; choose one of {', '.join(ENWIK8_PROTOCOLS)}"
        )
    n_train, n_valid, n_test = split_sizes
    if len(data) != n_train + n_valid + n_test:
        raise ValueError(
            f"enwik8 has {len(data)} bytes but the split {split_sizes} needs "
            f"{n_train + n_valid + n_test}"
        )
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = (raw[:n_train], raw[n_train : n_train + n_valid], raw[n_train + n_valid :])
    if protocol == "raw":
        return Corpus(*parts, vocab_size=256, unit="byte",
                      protocol="enwik8 raw bytes (newlines kept, 256 symbols), 90M/5M/5M")
    kept = [p[p != NEWLINE] for p in parts]
    present = torch.unique(torch.cat(kept))
    lookup = torch.zeros(256, dtype=torch.uint8)
    lookup[present.long()] = torch.arange(present.numel(), dtype=torch.uint8)
    encoded = [lookup[p.long()] for p in kept]
    return Corpus(
        *encoded,
        vocab_size=int(present.numel()),
        unit="character",
        protocol=f"enwik8 Transformer-XL pipeline (newlines dropped, {present.numel()} symbols), "
        f"90M/5M/5M",
    )


class SegmentWindows(Dataset):
    """Training examples: ``context`` symbols of memory warm-up, then a ``tgt_len`` segment.

    Example ``i`` covers ids ``[start - context, start + tgt_len + 1)`` with ``start = context +
    i * tgt_len``: the segments tile the split, so every symbol after the first ``context`` is a
    target exactly once per epoch.  ``__getitems__`` gathers a whole batch in one indexing op.
    """

    def __init__(self, ids: Tensor, tgt_len: int, context: int) -> None:
        if tgt_len <= 0 or context < 0:
            raise ValueError(f"need tgt_len > 0 and context >= 0, got {tgt_len}, {context}")
        self.ids, self.tgt_len, self.context = ids, tgt_len, context
        self.window = context + tgt_len + 1
        self.count = max((ids.numel() - 1 - context) // tgt_len, 0)
        self._offsets = torch.arange(self.window)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.count):
            raise IndexError(f"window index out of range 0..{self.count - 1}")
        starts = idx * self.tgt_len  # = start - context
        return self.ids[starts[:, None] + self._offsets].long()


class TrainStreams(Dataset):
    """Training segments of ``n_streams`` contiguous streams in reading order (the reference's
    ``LMOrderedIterator`` over the train split).

    The split is cut into ``n_streams`` equally long streams (the remainder is dropped).  Example
    ``i`` is segment ``i // n_streams`` of stream ``i % n_streams``: ``tgt_len + 1`` ids, inputs
    and targets one apart.  Read in index order ``n_streams`` at a time, batch ``b`` holds segment
    ``b`` of every stream, and its row ``s`` continues row ``s`` of batch ``b - 1``; a DDP process
    taking the ``r``-th equal slice of each batch owns the same streams throughout.  A stream's
    last incomplete segment is dropped (the reference reads it as a shorter one).
    """

    def __init__(self, ids: Tensor, n_streams: int, tgt_len: int) -> None:
        if n_streams <= 0 or tgt_len <= 0:
            raise ValueError(f"need n_streams > 0 and tgt_len > 0, got {n_streams}, {tgt_len}")
        self.stream_len = ids.numel() // n_streams
        self.segments_per_stream = max((self.stream_len - 1) // tgt_len, 0)
        if self.segments_per_stream == 0:
            raise ValueError(
                f"a train split of {ids.numel()} symbols is too short for {n_streams} streams of "
                f"at least {tgt_len + 1} symbols (data.batch_size x model.tgt_len)"
            )
        self.ids, self.n_streams, self.tgt_len = ids, n_streams, tgt_len
        self._offsets = torch.arange(tgt_len + 1)

    def __len__(self) -> int:
        return self.n_streams * self.segments_per_stream

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"segment index out of range 0..{len(self) - 1}")
        stream, segment = idx % self.n_streams, idx // self.n_streams
        starts = stream * self.stream_len + segment * self.tgt_len
        return self.ids[starts[:, None] + self._offsets].long()


class EvalStreams(Dataset):
    """Evaluation data as ``n_streams`` contiguous, equally long streams (the reference's
    ``LMOrderedIterator``: the split cut into ``batch_size`` rows, the remainder dropped).

    Each stream is read segment by segment with memory; its first symbol is context only.
    """

    def __init__(self, ids: Tensor, n_streams: int) -> None:
        if n_streams <= 0:
            raise ValueError(f"data.eval_streams must be positive, got {n_streams}")
        length = ids.numel() // n_streams
        if length < 2:
            raise ValueError(
                f"a split of {ids.numel()} symbols is too short for {n_streams} eval streams"
            )
        self.streams = ids[: length * n_streams].view(n_streams, length)

    def __len__(self) -> int:
        return self.streams.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.streams[index].long()

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.streams[torch.as_tensor(indices, dtype=torch.long)].long()
