"""Parsing data: vocabularies built on the training split, sentences encoded with their oracle
transitions and features (:mod:`.transitions`), and the on-disk feature cache.

Everything here is framework-free (lists and numpy); :mod:`.task` wraps it into a
:class:`~adanorm.lab.task.Task`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...checkpoint import atomic_write_stream
from ...data import DataFile, DatasetInfo, register_dataset
from .conll import Sentence, is_projective, root_count
from .transitions import NUM_FEATURES, ROOT, UNK, OracleError, oracle_transitions

__all__ = [
    "EWT_FILES",
    "EncodedSentence",
    "Vocab",
    "build_vocab",
    "encode_sentence",
    "featurize_treebank",
    "save_treebank",
    "load_treebank",
    "CacheError",
    "cache_key",
    "file_fingerprint",
]

# --- the registered treebank ----------------------------------------------------------------
_EWT_COMMIT = "15d613d8447b3478787d4c278730a1e48a945efb"  # UD_English-EWT, v2.16
_EWT_RAW = f"https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/{_EWT_COMMIT}/"
#: split -> (file name, sha256 of that file at _EWT_COMMIT).
EWT_FILES = {
    "train": (
        "en_ewt-ud-train.conllu",
        "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b",
    ),
    "valid": (
        "en_ewt-ud-dev.conllu",
        "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6",
    ),
    "test": (
        "en_ewt-ud-test.conllu",
        "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd",
    ),
}
register_dataset(
    DatasetInfo(
        name="ewt",
        subdir="ud_english_ewt",
        description="Universal Dependencies English Web Treebank v2.16 (CC BY-SA 4.0), CoNLL-U",
        homepage="https://universaldependencies.org/treebanks/en_ewt/",
        files=tuple(
            DataFile(name=name, sha256=digest, urls=(_EWT_RAW + name,))
            for name, digest in EWT_FILES.values()
        ),
    )
)

UNK_LABEL = "<unk>"  # label index 0: dev/test labels never seen in training


# --- vocabularies and encoding ------------------------------------------------------------------
@dataclass
class Vocab:
    """Word, tag and label vocabularies built from the training split."""

    words: list[str]  # ids 3.. (0 NULL, 1 UNK, 2 ROOT are implicit)
    tags: list[str]  # ids 3..
    labels: list[str]  # label index 0 is UNK_LABEL
    lowercase: bool

    def __post_init__(self) -> None:
        self._word_ids = {w: i + 3 for i, w in enumerate(self.words)}
        self._tag_ids = {t: i + 3 for i, t in enumerate(self.tags)}
        self._label_ids = {lab: i for i, lab in enumerate(self.labels)}

    @property
    def num_words(self) -> int:
        return len(self.words) + 3

    @property
    def num_tags(self) -> int:
        return len(self.tags) + 3

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_transitions(self) -> int:
        return 1 + 2 * len(self.labels)

    def word_id(self, form: str) -> int:
        return self._word_ids.get(form.lower() if self.lowercase else form, UNK)

    def tag_id(self, tag: str) -> int:
        return self._tag_ids.get(tag, UNK)

    def label_index(self, label: str) -> int:
        return self._label_ids.get(label, 0)

    def to_json(self) -> str:
        return json.dumps(
            {
                "words": self.words,
                "tags": self.tags,
                "labels": self.labels,
                "lowercase": self.lowercase,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        return cls(d["words"], d["tags"], d["labels"], d["lowercase"])


def build_vocab(train: Sequence[Sentence], min_word_count: int, lowercase: bool) -> Vocab:
    """Words seen at least ``min_word_count`` times (rarer ones train the UNK embedding), all
    tags and labels of the training split, in a deterministic order."""
    if min_word_count < 1:
        raise ValueError(f"min_word_count must be >= 1, got {min_word_count}")
    counts = Counter(f.lower() if lowercase else f for s in train for f in s.forms)
    words = sorted(w for w, c in counts.items() if c >= min_word_count)
    tags = sorted({t for s in train for t in s.tags})
    labels = [UNK_LABEL, *sorted({lab for s in train for lab in s.deprels})]
    return Vocab(words, tags, labels, lowercase)


@dataclass
class EncodedSentence:
    """A sentence as ids, with its oracle transitions and features when it has them.

    ``words``/``tags`` include ROOT at index 0; ``heads``, ``labels`` (label indices) and
    ``punct`` are over words ``1..n``.  ``features`` is ``(T, 48)`` and ``transitions`` ``(T,)``;
    both are empty (T = 0) for sentences the static oracle cannot derive.
    """

    words: np.ndarray
    tags: np.ndarray
    heads: np.ndarray
    labels: np.ndarray
    punct: np.ndarray
    features: np.ndarray
    transitions: np.ndarray

    def __len__(self) -> int:
        return int(self.heads.shape[0])


def encode_sentence(sentence: Sentence, vocab: Vocab) -> EncodedSentence:
    words = [ROOT] + [vocab.word_id(f) for f in sentence.forms]
    tags = [ROOT] + [vocab.tag_id(t) for t in sentence.tags]
    labels = [vocab.label_index(d) for d in sentence.deprels]
    try:
        if root_count(sentence.heads) != 1 or not is_projective(sentence.heads):
            raise OracleError("non-projective or not single-rooted")
        transitions, features = oracle_transitions(
            sentence.heads, labels, vocab.num_labels, words, tags
        )
    except OracleError:
        transitions, features = [], []
    return EncodedSentence(
        words=np.asarray(words, dtype=np.int64),
        tags=np.asarray(tags, dtype=np.int64),
        heads=np.asarray(sentence.heads, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        punct=np.asarray(sentence.punct, dtype=bool),
        # int32 halves the cache and memory (~75 MB for EWT train); nn.Embedding accepts it.
        features=np.asarray(features, dtype=np.int32).reshape(-1, NUM_FEATURES),
        transitions=np.asarray(transitions, dtype=np.int64),
    )


# --- the feature cache --------------------------------------------------------------------------
CACHE_FORMAT = "adanorm-parsing-features/1"
_ARRAYS = ("words", "tags", "heads", "labels", "punct", "features", "transitions")


class CacheError(ValueError):
    """A feature cache file is unreadable (truncated, corrupted, or of another format)."""


def file_fingerprint(path: Path) -> dict[str, object]:
    """What identifies a treebank file for the cache: resolved path, size and mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(payload: dict[str, object]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def save_treebank(
    path: Path, vocab: Vocab, splits: dict[str, list[EncodedSentence]], info: dict[str, int]
) -> None:
    """Write vocab + encoded splits to one ``.npz`` atomically and durably (fsync, then rename):
    concurrent runs share it, and a crash leaves the old file or the new one, never a torn one."""
    arrays: dict[str, np.ndarray] = {
        "format": np.frombuffer(CACHE_FORMAT.encode(), dtype=np.uint8),
        "vocab": np.frombuffer(vocab.to_json().encode(), dtype=np.uint8),
        "info": np.frombuffer(json.dumps(info).encode(), dtype=np.uint8),
    }
    for split, sentences in splits.items():
        for name in _ARRAYS:
            parts = [getattr(s, name) for s in sentences]
            arrays[f"{split}/{name}"] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            arrays[f"{split}/{name}_len"] = np.asarray([len(p) for p in parts], dtype=np.int64)
    atomic_write_stream(path, lambda fh: np.savez(fh, **arrays))


def load_treebank(path: Path) -> tuple[Vocab, dict[str, list[EncodedSentence]], dict[str, int]]:
    """Read a cache written by :func:`save_treebank`; :class:`CacheError` if it is unreadable.

    The zip's CRC-32 catches corrupted bytes, the format marker another layout, and the length
    checks arrays that do not add up."""
    try:
        return _load_treebank(path)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # BadZipFile, EOFError, KeyError, ValueError, zlib.error, ...
        raise CacheError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _load_treebank(path: Path) -> tuple[Vocab, dict[str, list[EncodedSentence]], dict[str, int]]:
    with np.load(path, allow_pickle=False) as z:
        found = z["format"].tobytes().decode() if "format" in z.files else None
        if found != CACHE_FORMAT:
            raise ValueError(f"format {found!r}, expected {CACHE_FORMAT!r}")
        vocab = Vocab.from_json(z["vocab"].tobytes().decode())
        info = json.loads(z["info"].tobytes().decode())
        splits: dict[str, list[EncodedSentence]] = {}
        for split in ("train", "valid", "test"):
            pieces = {}
            for name in _ARRAYS:
                flat, lengths = z[f"{split}/{name}"], z[f"{split}/{name}_len"]
                width = NUM_FEATURES if name == "features" else 1
                if int(lengths.sum()) * width != flat.size:
                    raise ValueError(f"{split}/{name}: lengths do not add up to the array")
                if name == "features":
                    flat = flat.reshape(-1, NUM_FEATURES)
                pieces[name] = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
            splits[split] = [
                EncodedSentence(**{name: pieces[name][i] for name in _ARRAYS})
                for i in range(len(pieces["heads"]))
            ]
    return vocab, splits, info


def featurize_treebank(
    raw: dict[str, list[Sentence]], min_word_count: int, lowercase: bool
) -> tuple[Vocab, dict[str, list[EncodedSentence]], dict[str, int]]:
    """Vocab from ``raw["train"]``, every split encoded, and counts for the logs and the docs."""
    vocab = build_vocab(raw["train"], min_word_count, lowercase)
    splits = {name: [encode_sentence(s, vocab) for s in sents] for name, sents in raw.items()}
    info: dict[str, int] = {}
    for name, sents in splits.items():
        info[f"{name}_sentences"] = len(sents)
        info[f"{name}_words"] = sum(len(s) for s in sents)
        info[f"{name}_not_oracle_derivable"] = sum(
            1 for s in sents if len(s.transitions) == 0 and len(s) > 0
        )
        info[f"{name}_transitions"] = sum(len(s.transitions) for s in sents)
    return vocab, splits, info
