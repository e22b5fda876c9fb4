"""Treebank reading, the arc-standard transition system, Chen & Manning features and the cache.

Everything here is framework-free (lists and numpy); :mod:`adanorm.lab.tasks.parsing` wraps it into
a :class:`~adanorm.lab.task.Task`.

Conventions
-----------
* A sentence of ``n`` words is indexed ``1..n``; index ``0`` is the artificial ROOT.
* Arc-standard (Nivre 2004, as in Chen & Manning 2014): the stack starts as ``[ROOT]``, the buffer
  as ``1..n``.  SHIFT moves the buffer front onto the stack; LEFT-ARC(l) makes the top ``s1`` the
  head of the second ``s2`` and pops ``s2``; RIGHT-ARC(l) makes ``s2`` the head of ``s1`` and pops
  ``s1``.  ROOT may take a dependent only by RIGHT-ARC once the buffer is empty, so every
  terminal configuration is a projective tree with exactly one word attached to ROOT.
* Transition ids: ``0`` = SHIFT, ``1 + l`` = LEFT-ARC(l), ``1 + L + l`` = RIGHT-ARC(l) for label
  index ``l`` of ``L`` labels.
* Feature ids: ``0`` = NULL (no such position) in all three vocabularies; words and tags also have
  ``1`` = UNK and ``2`` = ROOT; label features are ``1 + l``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Sentence",
    "EncodedSentence",
    "Vocab",
    "ParseState",
    "OracleError",
    "read_conllu",
    "read_conllx",
    "is_projective",
    "root_count",
    "oracle_transitions",
    "extract_features",
    "legal_moves",
    "apply_transition",
    "build_vocab",
    "encode_sentence",
    "featurize_treebank",
    "save_treebank",
    "load_treebank",
    "CacheError",
    "cache_key",
    "file_fingerprint",
    "NUM_WORD_FEATURES",
    "NUM_TAG_FEATURES",
    "NUM_LABEL_FEATURES",
    "NUM_FEATURES",
    "NULL",
    "UNK",
    "ROOT",
    "DEFAULT_PTB_PUNCT_TAGS",
]

NULL, UNK, ROOT = 0, 1, 2
UNK_LABEL = "<unk>"  # label index 0: dev/test labels never seen in training
NUM_WORD_FEATURES = 18  # s1..s3, b1..b3, and 12 children of s1 and s2
NUM_TAG_FEATURES = 18  # the same 18 positions
NUM_LABEL_FEATURES = 12  # the 12 children positions
NUM_FEATURES = NUM_WORD_FEATURES + NUM_TAG_FEATURES + NUM_LABEL_FEATURES
#: The usual PTB punctuation tags for "UAS without punctuation" (gold tags).
DEFAULT_PTB_PUNCT_TAGS = ("``", "''", ",", ".", ":")


class OracleError(ValueError):
    """The static oracle cannot derive a sentence's gold tree (non-projective or multi-rooted)."""


@dataclass
class Sentence:
    """One gold sentence: parallel lists over words ``1..n`` (no ROOT entry)."""

    forms: list[str]
    tags: list[str]
    heads: list[int]
    deprels: list[str]
    punct: list[bool]

    def __len__(self) -> int:
        return len(self.forms)


# --- readers ------------------------------------------------------------------------------------
def _check_heads(heads: Sequence[int], where: str) -> None:
    n = len(heads)
    for i, h in enumerate(heads, start=1):
        if not 0 <= h <= n or h == i:
            raise ValueError(f"{where}: word {i} has head {h}, outside 0..{n} or itself")


def read_conllu(path: str | os.PathLike[str], pos_field: str = "xpos") -> list[Sentence]:
    """Read a CoNLL-U file with the ``conllu`` library, keeping only syntactic words.

    Multiword-token ranges (``3-4``) and empty nodes (``8.1``) are skipped: ``conllu`` gives them
    tuple ids, words have int ids.  Punctuation is gold UPOS ``PUNCT`` (the UD rule) whatever
    ``pos_field`` (``"upos"`` or ``"xpos"``) feeds the parser.
    """
    import conllu

    if pos_field not in ("upos", "xpos"):
        raise ValueError(f"pos_field for CoNLL-U must be 'upos' or 'xpos', got {pos_field!r}")
    sentences = []
    with open(path, encoding="utf-8") as fh:
        for number, tokens in enumerate(conllu.parse_incr(fh), start=1):
            words = [t for t in tokens if isinstance(t["id"], int)]
            where = f"{path}: sentence {number} ({tokens.metadata.get('sent_id', '?')})"
            if [t["id"] for t in words] != list(range(1, len(words) + 1)):
                raise ValueError(f"{where}: word ids are not 1..n")
            heads = []
            for t in words:
                if not isinstance(t["head"], int):
                    raise ValueError(f"{where}: word {t['id']} has no integer head ({t['head']!r})")
                heads.append(t["head"])
            _check_heads(heads, where)
            sentences.append(
                Sentence(
                    forms=[t["form"] for t in words],
                    tags=[str(t[pos_field]) for t in words],
                    heads=heads,
                    deprels=[t["deprel"] for t in words],
                    punct=[t["upos"] == "PUNCT" for t in words],
                )
            )
    return sentences


def read_conllx(
    path: str | os.PathLike[str],
    pos_field: str = "postag",
    punct_tags: Iterable[str] = DEFAULT_PTB_PUNCT_TAGS,
) -> list[Sentence]:
    """Read a CoNLL-X file (10 tab-separated columns: ID FORM LEMMA CPOSTAG POSTAG FEATS HEAD
    DEPREL PHEAD PDEPREL).  A word is punctuation when its gold ``pos_field`` tag (``"cpostag"``
    or ``"postag"``) is in ``punct_tags``."""
    columns = {"cpostag": 3, "postag": 4}
    if pos_field not in columns:
        raise ValueError(f"pos_field for CoNLL-X must be 'cpostag' or 'postag', got {pos_field!r}")
    col = columns[pos_field]
    punct_set = set(punct_tags)
    sentences: list[Sentence] = []
    rows: list[list[str]] = []

    def flush(line_no: int) -> None:
        if not rows:
            return
        where = f"{path}: sentence ending before line {line_no}"
        ids = [r[0] for r in rows]
        if ids != [str(i) for i in range(1, len(rows) + 1)]:
            raise ValueError(f"{where}: word ids {ids[:8]}... are not 1..n")
        try:
            heads = [int(r[6]) for r in rows]
        except ValueError as exc:
            raise ValueError(f"{where}: a HEAD is not an integer ({exc})") from exc
        _check_heads(heads, where)
        sentences.append(
            Sentence(
                forms=[r[1] for r in rows],
                tags=[r[col] for r in rows],
                heads=heads,
                deprels=[r[7] for r in rows],
                punct=[r[col] in punct_set for r in rows],
            )
        )
        rows.clear()

    with open(path, encoding="utf-8") as fh:
        line_no = 0
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                flush(line_no)
                continue
            if line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 10:
                raise ValueError(
                    f"{path}:{line_no}: expected 10 tab-separated CoNLL-X columns, got "
                    f"{len(parts)}: {line[:80]!r}"
                )
            rows.append(parts)
        flush(line_no + 1)
    return sentences


# --- tree properties ----------------------------------------------------------------------------
def root_count(heads: Sequence[int]) -> int:
    return sum(1 for h in heads if h == 0)


def is_projective(heads: Sequence[int]) -> bool:
    """True if no two arcs cross, the arc from ROOT (position 0) included."""
    arcs = sorted((min(h, d), max(h, d)) for d, h in enumerate(heads, start=1))
    for i, (left1, right1) in enumerate(arcs):
        for left2, right2 in arcs[i + 1 :]:
            if left2 >= right1:
                break  # arcs are sorted by left end: no later arc starts inside this one
            if left1 < left2 < right1 < right2:
                return False
    return True


# --- the transition system ----------------------------------------------------------------------
@dataclass
class ParseState:
    """A configuration for a sentence of ``n`` words; ``labels`` holds label *feature* ids."""

    n: int
    stack: list[int] = field(default_factory=lambda: [0])
    buffer: int = 1  # the next word to shift; the buffer is empty when buffer > n
    heads: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    left: list[list[int]] = field(default_factory=list)  # left children, leftmost last
    right: list[list[int]] = field(default_factory=list)  # right children, rightmost last

    def __post_init__(self) -> None:
        if not self.heads:
            self.heads = [-1] * (self.n + 1)
            self.labels = [NULL] * (self.n + 1)
            self.left = [[] for _ in range(self.n + 1)]
            self.right = [[] for _ in range(self.n + 1)]

    @property
    def terminal(self) -> bool:
        return len(self.stack) == 1 and self.buffer > self.n


def legal_moves(state: ParseState) -> tuple[bool, bool, bool]:
    """Whether SHIFT, LEFT-ARC and RIGHT-ARC are legal (the single-root rule included)."""
    depth = len(state.stack)
    buffer_empty = state.buffer > state.n
    return (not buffer_empty, depth > 2, depth > 2 or (depth == 2 and buffer_empty))


def apply_transition(state: ParseState, transition: int, num_labels: int) -> None:
    """Apply transition id ``transition``; the caller guarantees it is legal."""
    stack = state.stack
    if transition == 0:
        stack.append(state.buffer)
        state.buffer += 1
        return
    if transition <= num_labels:  # LEFT-ARC: s1 heads s2
        dependent = stack.pop(-2)
        head = stack[-1]
        label = transition - 1
        # Each new left dependent is the stack element just below the head, so it lies left of
        # all earlier ones: appending keeps the leftmost child last.
        state.left[head].append(dependent)
    else:  # RIGHT-ARC: s2 heads s1
        dependent = stack.pop()
        head = stack[-1]
        label = transition - 1 - num_labels
        state.right[head].append(dependent)  # right dependents arrive left to right
    state.heads[dependent] = head
    state.labels[dependent] = 1 + label


def extract_features(state: ParseState, words: Sequence[int], tags: Sequence[int]) -> list[int]:
    """Chen & Manning (2014)'s 48 features: 18 word ids, 18 tag ids, 12 label ids.

    Positions: s1, s2, s3, b1, b2, b3, then for s = s1, s2: lc1(s), rc1(s), lc2(s), rc2(s),
    lc1(lc1(s)), rc1(rc1(s)).  ``words``/``tags`` are ids indexed by position (0 = ROOT).
    """
    stack, left, right = state.stack, state.left, state.right
    depth = len(stack)
    s1 = stack[-1] if depth > 0 else -1
    s2 = stack[-2] if depth > 1 else -1
    s3 = stack[-3] if depth > 2 else -1
    b, n = state.buffer, state.n
    positions = [
        s1,
        s2,
        s3,
        b if b <= n else -1,
        b + 1 if b + 1 <= n else -1,
        b + 2 if b + 2 <= n else -1,
    ]
    children: list[int] = []
    for s in (s1, s2):
        if s < 0:
            children += [-1, -1, -1, -1, -1, -1]
            continue
        lefts, rights = left[s], right[s]
        lc1 = lefts[-1] if lefts else -1
        rc1 = rights[-1] if rights else -1
        lc2 = lefts[-2] if len(lefts) > 1 else -1
        rc2 = rights[-2] if len(rights) > 1 else -1
        lc1lc1 = left[lc1][-1] if lc1 >= 0 and left[lc1] else -1
        rc1rc1 = right[rc1][-1] if rc1 >= 0 and right[rc1] else -1
        children += [lc1, rc1, lc2, rc2, lc1lc1, rc1rc1]
    positions += children
    labels = state.labels
    return (
        [words[p] if p >= 0 else NULL for p in positions]
        + [tags[p] if p >= 0 else NULL for p in positions]
        + [labels[p] if p >= 0 else NULL for p in children]
    )


def oracle_transitions(
    heads: Sequence[int],
    label_ids: Sequence[int],
    num_labels: int,
    words: Sequence[int] | None = None,
    tags: Sequence[int] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """The static arc-standard oracle: the transitions that build the gold tree (and, if ``words``
    and ``tags`` are given, the features of every configuration on the way).

    Prefers LEFT-ARC, then RIGHT-ARC once ``s1`` has all its dependents, then SHIFT.  Raises
    :class:`OracleError` if the gold tree is not derivable (non-projective or not single-rooted).
    """
    n = len(heads)
    gold = [-1, *heads]
    missing = [0] * (n + 1)  # dependents of each position not yet attached
    for h in heads:
        missing[h] += 1
    state = ParseState(n)
    transitions: list[int] = []
    features: list[list[int]] = []
    while not state.terminal:
        if words is not None and tags is not None:
            features.append(extract_features(state, words, tags))
        stack = state.stack
        depth = len(stack)
        if depth > 2 and gold[stack[-2]] == stack[-1]:
            t = 1 + label_ids[stack[-2] - 1]
        elif (
            depth >= 2
            and gold[stack[-1]] == stack[-2]
            and missing[stack[-1]] == 0
            and (stack[-2] != 0 or state.buffer > n)
        ):
            t = 1 + num_labels + label_ids[stack[-1] - 1]
        elif state.buffer <= n:
            t = 0
        else:
            raise OracleError("no transition leads to the gold tree (non-projective tree?)")
        if t != 0:
            dependent = stack[-2] if t <= num_labels else stack[-1]
            missing[gold[dependent]] -= 1
        apply_transition(state, t, num_labels)
        transitions.append(t)
    if state.heads[1:] != list(heads):
        raise OracleError("the oracle's tree differs from the gold tree (not single-rooted?)")
    return transitions, features


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
