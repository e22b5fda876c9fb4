"""Machine-translation data: raw parallel text to BPE ids, and the BLEU scores MT papers report.

``prepare_corpus(data_cfg, data_root, cache_dir)`` runs one *recipe* (``data_cfg["name"]``) and
returns a :class:`PreparedCorpus`: a joined :class:`Dictionary`, the three splits as int64 id
tensors (no eos; the task appends it) and, for valid and test, the two references BLEU needs.
Every recipe ends the same way: joint BPE learned on the training source and target together
(subword-nmt, sentencepiece or none), a length filter on train, the dictionary built on train,
and a cache keyed by the options, the sha256 of every input file and :data:`PREP_VERSION`.

The recipes follow the scripts the literature used, step by step (``shared/notes/ecosystem.md``
§2.2); where one differs, its docstring says how:

* ``multi30k`` (the real data shipped in ``shared/data``): WMT16 multimodal task 1, the official
  preprocessing (lowercase, ``normalize-punctuation.perl``, ``tokenizer.perl``) with sacremoses.
* ``iwslt14_de_en``: fairseq's ``examples/translation/prepare-iwslt14.sh``, from the user's copy
  of the IWSLT 2014 ``de-en.tgz`` release (``data.raw_dir``).
* ``iwslt15_en_vi``: the Stanford NMT files (Luong & Manning 2015), already tokenized.
* ``wmt14_en_de``: fairseq's ``examples/translation/prepare-wmt14en2de.sh``, from the user's files.

**Two BLEUs, always labelled.**  *Tokenized BLEU* (:func:`tokenized_bleu`) scores BPE-removed,
Moses-tokenized hypotheses against ``ref_tok`` (lower-cased when the recipe lower-cases) with no
further tokenization and no smoothing: what ``multi-bleu.perl`` and fairseq's ``generate.py
--remove-bpe`` print, the number the paper reports.  *Detokenized sacreBLEU*
(:func:`sacrebleu_detok`) scores Moses-detokenized hypotheses against the raw references
(``ref_detok``) with sacreBLEU's 13a tokenizer and prints its signature.  Both are computed from
additive sufficient statistics (:func:`bleu_statistics`), so shards can be scored apart and summed.

**Moses escaping.**  ``tokenizer.perl`` writes ``'`` as ``&apos;``, ``"`` as ``&quot;`` and so on
unless told ``-no-escape``; the fairseq recipes keep the entities (and so does the shipped
IWSLT14 test file), so ``iwslt14_de_en`` and ``wmt14_en_de`` escape by default.  ``multi30k``
does not (``data.moses_escape: false``): an entity is one token either way, so tokenized BLEU is
unchanged, and the vocabulary and detokenized output stay plain text.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import atomic_save, atomic_write_bytes, atomic_write_text
from ..data import DataFile, DatasetInfo, register_dataset, require_dataset, sha256_of

__all__ = [
    "PREP_VERSION",
    "SPECIALS",
    "RECIPES",
    "BPE_METHODS",
    "SACREBLEU_SMOOTH",
    "MULTI30K",
    "Dictionary",
    "SplitData",
    "PreparedCorpus",
    "prepare_corpus",
    "clean_corpus",
    "Postprocessor",
    "bleu_statistics",
    "bleu_from_statistics",
    "tokenized_bleu",
    "sacrebleu_detok",
    "sacrebleu_signature",
]

#: Bump when a code change alters what a recipe produces: it is part of every cache key.
PREP_VERSION = 1
#: The special symbols and their ids (pad=0, bos=1, eos=2, unk=3).
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
RECIPES = ("multi30k", "iwslt14_de_en", "iwslt15_en_vi", "wmt14_en_de")
BPE_METHODS = ("subword-nmt", "sentencepiece", "none")
#: sacreBLEU's default smoothing, which :func:`sacrebleu_detok` and its signature use.  Summed
#: 13a statistics reproduce that score with ``bleu_from_statistics(s, smooth_method=...)``.
SACREBLEU_SMOOTH = "exp"
SPLITS = ("train", "valid", "test")

_MULTI30K_RAW = (
    "https://raw.githubusercontent.com/multi30k/dataset/"
    "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
)
_MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}
# File names may contain a folder: require_dataset joins them under the subdir and the download
# creates the folder, so the shared data's layout (multi30k/raw/*.gz) is the registered one.
MULTI30K = register_dataset(
    DatasetInfo(
        name="multi30k",
        subdir="multi30k",
        description="Multi30k task 1 En-De (WMT16 multimodal), raw cased text: 29,000 / 1,014 / "
        "1,000 pairs (train / val / test2016 flickr)",
        homepage="https://github.com/multi30k/dataset",
        files=tuple(
            DataFile(name=f"raw/{name}", sha256=digest, urls=(_MULTI30K_RAW + name,))
            for name, digest in _MULTI30K_SHA256.items()
        ),
    )
)


# --- the dictionary -------------------------------------------------------------------------------
class Dictionary:
    """A joined source+target vocabulary in fairseq's style: specials first, then the tokens by
    descending count (ties by token, so a rebuild is identical).

    Tokens are whitespace-separated strings; ``<unk>`` covers the rest.  A literal special symbol
    in the text (``<pad>``, ``<s>``, ``</s>``) encodes as unk: ids 0-2 only ever mean structure.
    """

    pad = 0
    bos = 1
    eos = 2
    unk = 3

    def __init__(self, tokens: Sequence[str] = (), counts: Sequence[int] | None = None) -> None:
        """``tokens`` are the non-special symbols in id order (ids start at ``len(SPECIALS)``)."""
        counts = [0] * len(tokens) if counts is None else list(counts)
        if len(counts) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(counts)} counts")
        self._symbols: list[str] = list(SPECIALS)
        self._counts: list[int] = [0] * len(SPECIALS)
        self._index: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
        for token, count in zip(tokens, counts, strict=True):
            if not token or token.split() != [token]:
                raise ValueError(f"a dictionary token must be non-empty without whitespace: "
                                 f"{token!r}")
            if token in self._index:
                raise ValueError(f"token {token!r} appears twice (or is a special symbol)")
            self._index[token] = len(self._symbols)
            self._symbols.append(token)
            self._counts.append(int(count))

    def __len__(self) -> int:
        return len(self._symbols)

    def __getitem__(self, index: int) -> str:
        return self._symbols[index]

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dictionary):
            return NotImplemented
        return self._symbols == other._symbols and self._counts == other._counts

    def __repr__(self) -> str:
        return f"Dictionary({len(self)} symbols)"

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    @property
    def counts(self) -> list[int]:
        return list(self._counts)

    def index(self, token: str) -> int:
        """The id of ``token``; unk for unknown tokens and for pad/bos/eos written as text."""
        i = self._index.get(token, self.unk)
        return self.unk if i < self.unk else i

    @classmethod
    def build(cls, lines: Iterable[str], min_count: int = 1) -> Dictionary:
        """Count whitespace tokens; keep those seen at least ``min_count`` times."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counter: Counter[str] = Counter()
        for line in lines:
            counter.update(line.split())
        for special in SPECIALS:
            counter.pop(special, None)
        kept = sorted((item for item in counter.items() if item[1] >= min_count),
                      key=lambda item: (-item[1], item[0]))
        return cls([t for t, _ in kept], [c for _, c in kept])

    def encode(self, line: str) -> list[int]:
        """Whitespace-split ids, unknown tokens as unk.  No eos: the task adds bos/eos."""
        get, unk = self._index.get, self.unk
        return [i if i > unk else unk for i in (get(t, unk) for t in line.split())]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Tokens joined by spaces; pad, bos and eos are skipped, unk is written ``<unk>``."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._symbols):
                raise IndexError(f"id {i} is outside the dictionary (size {len(self)})")
            if i > self.eos:
                out.append(self._symbols[i])
        return " ".join(out)

    def save(self, path: str | os.PathLike[str]) -> None:
        """fairseq's ``dict.txt``: ``token count`` per line, specials implied; atomic."""
        lines = (f"{t} {c}\n" for t, c in zip(self._symbols[4:], self._counts[4:], strict=True))
        atomic_write_text(path, "".join(lines))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Dictionary:
        tokens, counts = [], []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                parts = line.rstrip("\n").split(" ")
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"{path}:{n}: expected 'token count', got {line!r}")
                tokens.append(parts[0])
                counts.append(int(parts[1]))
        return cls(tokens, counts)


# --- prepared data --------------------------------------------------------------------------------
@dataclass
class SplitData:
    """One split: BPE ids per sentence (int64, 1-D, no eos) and the target references.

    ``ref_tok`` (tokenized BLEU) is the Moses-tokenized target, lower-cased when the recipe
    lower-cases, without BPE; ``ref_detok`` (sacreBLEU) is the raw target text.  Both are empty for
    train, which is never scored.
    """

    src: list[Tensor]
    tgt: list[Tensor]
    ref_tok: list[str] = field(default_factory=list)
    ref_detok: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class PreparedCorpus:
    dictionary: Dictionary
    splits: dict[str, SplitData]
    src_lang: str
    tgt_lang: str
    info: dict[str, Any]

    @property
    def lowercase(self) -> bool:
        """Whether the recipe lower-cased the text (and so the references): the recipe's default
        applies when the config does not say."""
        return bool(self.info["lowercase"])

    @property
    def bpe(self) -> str:
        return str(self.info["bpe"]["method"])

    def postprocessor(self) -> Postprocessor:
        return Postprocessor(self.tgt_lang, self.bpe)


# --- reading and Moses steps ----------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    """UTF-8 lines split on ``\\n`` only (not ``str.splitlines``, which also breaks on U+0085 and
    U+2028 where Perl's line reading would not); ``.gz`` is decompressed."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        text = fh.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _squeeze(line: str) -> str:
    return " ".join(line.split())


def _remove_non_printing(line: str) -> str:
    """Moses ``remove-non-printing-char.perl``: every ``\\p{C}`` character becomes a space."""
    if line.isprintable():  # fast path: isprintable() is False for every category C character
        return line
    return "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in line)


class _Moses:
    """sacremoses stand-ins for the Moses perl scripts, one instance per language: optionally
    ``normalize-punctuation.perl`` and ``remove-non-printing-char.perl``, then ``tokenizer.perl``
    (``escape``: entities; ``aggressive``: ``-a``, hyphens as ``@-@``)."""

    def __init__(self, lang: str, *, escape: bool, aggressive: bool, normalize: bool,
                 remove_non_printing: bool = False) -> None:
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        self.tokenizer = MosesTokenizer(lang)
        self.normalizer = MosesPunctNormalizer(lang) if normalize else None
        self.escape, self.aggressive = escape, aggressive
        self.remove_non_printing = remove_non_printing

    def __call__(self, line: str, *, lowercase_first: bool = False) -> str:
        if lowercase_first:
            line = line.lower()
        if self.normalizer is not None:
            line = self.normalizer.normalize(line)
        if self.remove_non_printing:
            line = _remove_non_printing(line)
        if not line.strip():  # tokenizer.perl passes blank lines through
            return ""
        tokens = self.tokenizer.tokenize(
            line, aggressive_dash_splits=self.aggressive, escape=self.escape, return_str=True
        )
        return _squeeze(tokens)


def clean_corpus(
    src: Sequence[str], tgt: Sequence[str], *, ratio: float | None, min_len: int,
    max_len: int | None, max_word_length: int = 1000,
) -> tuple[list[int], list[str], list[str]]:
    """Moses ``clean-corpus-n.perl``: the indices of the pairs kept and their cleaned lines.

    As the script does: whitespace is squeezed, ``|`` is deleted unless the first pair contains
    one (then the corpus counts as factored), and a pair is dropped when either side is empty, has
    fewer than ``min_len`` or more than ``max_len`` words, the word-count ratio exceeds ``ratio``
    either way, or a word is longer than ``max_word_length`` characters.  ``None`` turns the
    ratio or the maximum off.
    """
    if len(src) != len(tgt):
        raise ValueError(f"clean_corpus: {len(src)} source lines but {len(tgt)} target lines")
    factored = bool(src) and ("|" in src[0] or "|" in tgt[0])
    long_word = re.compile(rf"[^\s|]{{{max_word_length + 1}}}")
    kept: list[int] = []
    out_src: list[str] = []
    out_tgt: list[str] = []
    for i, (f, e) in enumerate(zip(src, tgt, strict=True)):
        if not factored:
            f, e = f.replace("|", ""), e.replace("|", "")
        f, e = _squeeze(f), _squeeze(e)
        if not f or not e:
            continue
        fc, ec = f.count(" ") + 1, e.count(" ") + 1
        if fc < min_len or ec < min_len or (max_len is not None and max(fc, ec) > max_len):
            continue
        if ratio is not None and (fc / ec > ratio or ec / fc > ratio):
            continue
        if long_word.search(f) or long_word.search(e):
            continue
        kept.append(i)
        out_src.append(f)
        out_tgt.append(e)
    return kept, out_src, out_tgt


# --- recipes --------------------------------------------------------------------------------------
@dataclass
class _Text:
    """A recipe's output before BPE: tokenized lines per split and the raw target references."""

    src: dict[str, list[str]]
    tgt: dict[str, list[str]]
    ref_detok: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    post_bpe_clean: tuple[float, int, int, tuple[str, ...]] | None = None  # ratio, min, max, splits


@dataclass(frozen=True)
class _Recipe:
    name: str
    langs: tuple[str, str]
    default_src: str
    lowercase: bool
    bpe_merges: int
    escape: bool
    aggressive: bool
    protocol: str
    inputs: Callable[[dict[str, Any], Path], dict[str, Path]]
    read: Callable[[dict[str, Any], dict[str, Path]], _Text]
    registered_inputs: bool = False  # sha256 comes from the dataset registry (already verified)


def _raw_dir(opts: dict[str, Any], data_root: Path, recipe: str, where: str) -> Path:
    raw = opts.get("raw_dir")
    if not raw:
        raise FileNotFoundError(
            f"{recipe}: data.raw_dir is not set. This recipe reads the original release, which "
            f"is not shipped: {where} Set data.raw_dir to that folder (absolute, or relative to "
            f"the data root {data_root})."
        )
    path = Path(str(raw)).expanduser()
    if not path.is_absolute():
        path = data_root / path
    if not path.is_dir():
        raise FileNotFoundError(f"{recipe}: data.raw_dir {path} is not a directory. {where}")
    return path


def _need(path: Path, recipe: str, where: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{recipe}: missing input file {path.name} (looked for {path}). "
                                f"{where}")
    return path


def _head(lines: list[str], limit: int | None) -> list[str]:
    return lines if limit is None else lines[:limit]


def _pairs(recipe: str, src: list[str], tgt: list[str], what: str) -> None:
    if len(src) != len(tgt):
        raise ValueError(f"{recipe}: {what} has {len(src)} source lines but {len(tgt)} target "
                         f"lines; the files must be line-aligned")


# multi30k -----------------------------------------------------------------------------------------
_MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
MULTI30K_LANGS = ("de", "en")


def _multi30k_inputs(opts: dict[str, Any], data_root: Path) -> dict[str, Path]:
    directory = require_dataset("multi30k", data_root, download=bool(opts.get("download")))
    return {f"{split}.{lang}": directory / "raw" / f"{stem}.{lang}.gz"
            for split, stem in _MULTI30K_SPLITS.items() for lang in MULTI30K_LANGS}


def _multi30k_read(opts: dict[str, Any], paths: dict[str, Path]) -> _Text:
    """The official ``tok/*.lc.norm.tok.*`` pipeline: ``lowercase.perl`` (when lower-casing),
    ``normalize-punctuation.perl -l L``, ``tokenizer.perl -l L`` (with sacremoses; on val and
    test2016 it reproduces the official files in 4027 of 4028 lines, modulo the escaping).
    No cleaning: Multi30k has no empty or overlong lines."""
    src_lang, tgt_lang = opts["src_lang"], opts["tgt_lang"]
    movers = {lang: _Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                           normalize=True) for lang in (src_lang, tgt_lang)}
    text = _Text({}, {}, {}, {})
    for split in SPLITS:
        raw_src = _read_lines(paths[f"{split}.{src_lang}"])
        raw_tgt = _read_lines(paths[f"{split}.{tgt_lang}"])
        _pairs("multi30k", raw_src, raw_tgt, split)
        if split == "train":
            raw_src = _head(raw_src, opts["max_train_sentences"])
            raw_tgt = _head(raw_tgt, opts["max_train_sentences"])
        low = opts["lowercase"]
        text.src[split] = [movers[src_lang](line, lowercase_first=low) for line in raw_src]
        text.tgt[split] = [movers[tgt_lang](line, lowercase_first=low) for line in raw_tgt]
        text.ref_detok[split] = [] if split == "train" else raw_tgt
        text.counts[split] = {"input": len(raw_src)}
    return text


# iwslt14 ------------------------------------------------------------------------------------------
_IWSLT14_WHERE = (
    "Use the extracted de-en folder of the IWSLT 2014 release de-en.tgz (fairseq's "
    "prepare-iwslt14.sh downloads it from https://wit3.fbk.eu/archive/2014-01/texts/de/en/"
    "de-en.tgz, often offline: fairseq issues #2984 and #4361 list mirrors; extract it with "
    "`tar xzf de-en.tgz`)."
)
_IWSLT14_TEST = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                 "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
_IWSLT14_DROP = ("<url>", "<talkid>", "<keywords>")
_IWSLT14_STRIP = ("<title>", "</title>", "<description>", "</description>")
_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def _iwslt14_inputs(opts: dict[str, Any], data_root: Path) -> dict[str, Path]:
    raw = _raw_dir(opts, data_root, "iwslt14_de_en", _IWSLT14_WHERE)
    if not (raw / "train.tags.de-en.de").exists() and (raw / "de-en").is_dir():
        raw = raw / "de-en"  # the folder that holds the extracted de-en/
    paths = {}
    for lang in ("de", "en"):
        paths[f"train.{lang}"] = raw / f"train.tags.de-en.{lang}"
        for stem in _IWSLT14_TEST:
            paths[f"{stem}.{lang}"] = raw / f"{stem}.de-en.{lang}.xml"
    for path in paths.values():
        _need(path, "iwslt14_de_en", _IWSLT14_WHERE)
    return paths


def _seg_texts(path: Path) -> list[str]:
    """``grep '<seg id'`` then the script's two ``sed`` deletions of the tags."""
    return [_SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))
            for line in _read_lines(path) if "<seg id" in line]


def _iwslt14_read(opts: dict[str, Any], paths: dict[str, Path]) -> _Text:
    """fairseq's ``prepare-iwslt14.sh``, step by step:

    * train: drop lines with ``<url>``, ``<talkid>`` or ``<keywords>``; delete the ``<title>`` and
      ``<description>`` tags (keeping their text, as the script does); ``tokenizer.perl -l L``;
      ``clean-corpus-n.perl -ratio 1.5 ... 1 175`` on the tokenized text; ``lowercase.perl``;
      valid = the lines ``awk 'NR%23 == 0'`` selects (1-based: the 23rd, 46th, ... line, i.e.
      0-based indices 22, 45, ...), train = the rest.  Unlike the test, train does not map ’.
    * test: the ``<seg>`` texts of dev2010, TEDX.dev2012, tst2010, tst2011, tst2012 in that order,
      ’ mapped to ', tokenized and lower-cased.  ``ref_detok`` is the ``<seg>`` text as released.

    ``tokenizer.perl`` is run without ``-a`` as in the script; the shared ``iwslt14_de_en_eval``
    files, however, were made with ``-a`` (hyphens as ``@-@``): set ``data.moses_aggressive:
    true`` to match them.  Current ``tokenizer.perl`` (and sacremoses) no longer passes whole-line
    XML tags through untouched unless given ``-x``, so remaining tags such as ``<speaker>`` are
    tokenized like text, as a modern run of the script does.
    """
    src_lang, tgt_lang = opts["src_lang"], opts["tgt_lang"]
    movers = {lang: _Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                           normalize=False) for lang in (src_lang, tgt_lang)}
    low = opts["lowercase"]

    def train_side(lang: str) -> tuple[list[str], int]:
        kept, dropped = [], 0
        for line in _head(_read_lines(paths[f"train.{lang}"]), opts["max_train_sentences"]):
            if any(tag in line for tag in _IWSLT14_DROP):
                dropped += 1
                continue
            for tag in _IWSLT14_STRIP:
                line = line.replace(tag, "")
            kept.append(movers[lang](line))
        return kept, dropped

    src, dropped_src = train_side(src_lang)
    tgt, dropped_tgt = train_side(tgt_lang)
    _pairs("iwslt14_de_en", src, tgt, "train.tags.de-en (after dropping the tag lines)")
    n_tagged = len(src)
    kept, src, tgt = clean_corpus(src, tgt, ratio=opts["clean_ratio"], min_len=1,
                                  max_len=opts["clean_max_len"])
    if low:
        src, tgt = [s.lower() for s in src], [t.lower() for t in tgt]
    is_valid = [(i + 1) % 23 == 0 for i in range(len(src))]
    text = _Text({}, {}, {}, {})
    text.src["train"] = [s for s, v in zip(src, is_valid, strict=True) if not v]
    text.tgt["train"] = [t for t, v in zip(tgt, is_valid, strict=True) if not v]
    text.src["valid"] = [s for s, v in zip(src, is_valid, strict=True) if v]
    text.tgt["valid"] = [t for t, v in zip(tgt, is_valid, strict=True) if v]
    text.ref_detok["train"] = []
    # The valid split has no raw text left: the script carves it out of the tokenized train, so
    # its detokenized reference is the Moses detokenization of the (lower-cased) target.
    detok = Postprocessor(tgt_lang, "none")
    text.ref_detok["valid"] = [detok.detokenize(t) for t in text.tgt["valid"]]
    common = {"tag_lines_dropped": dropped_src, "tag_lines_dropped_target": dropped_tgt,
              "after_tags": n_tagged, "after_clean": len(kept)}
    text.counts["train"] = {**common, "input": n_tagged + dropped_src}
    text.counts["valid"] = {"input": sum(is_valid), "carved_from_train_every": 23}

    def test_side(lang: str) -> tuple[list[str], list[str]]:
        raw = [seg for stem in _IWSLT14_TEST for seg in _seg_texts(paths[f"{stem}.{lang}"])]
        tok = [movers[lang](seg.replace("\u2019", "'")) for seg in raw]
        return raw, [t.lower() for t in tok] if low else tok

    _, text.src["test"] = test_side(src_lang)
    raw_tgt, text.tgt["test"] = test_side(tgt_lang)
    _pairs("iwslt14_de_en", text.src["test"], text.tgt["test"], "the test set")
    text.ref_detok["test"] = raw_tgt
    text.counts["test"] = {"input": len(raw_tgt)}
    return text


# iwslt15 ------------------------------------------------------------------------------------------
_IWSLT15_WHERE = (
    "Use the Stanford NMT files train.{en,vi}, tst2012.{en,vi} and tst2013.{en,vi} from "
    "https://nlp.stanford.edu/projects/nmt/ (IWSLT'15 English-Vietnamese); tst2012/tst2013 are "
    "also in shared/data/iwslt15_en_vi_eval."
)
_IWSLT15_FILES = {"train": "train", "valid": "tst2012", "test": "tst2013"}


def _iwslt15_inputs(opts: dict[str, Any], data_root: Path) -> dict[str, Path]:
    raw = _raw_dir(opts, data_root, "iwslt15_en_vi", _IWSLT15_WHERE)
    return {f"{split}.{lang}": _need(raw / f"{stem}.{lang}", "iwslt15_en_vi", _IWSLT15_WHERE)
            for split, stem in _IWSLT15_FILES.items() for lang in ("en", "vi")}


def _iwslt15_read(opts: dict[str, Any], paths: dict[str, Path]) -> _Text:
    """The Stanford files are already Moses-tokenized (with entities) and cased: they are used as
    they are (whitespace squeezed; lower-cased only if configured).  There is no raw text, so
    ``ref_detok`` is the Moses detokenization of the cased target.

    Luong & Manning (2015) used word vocabularies (17.2k En / 7.7k Vi); fairseq has no En-Vi
    recipe, and papers built on fairseq (AdaNorm's code included) use joint BPE or the word
    vocabulary.  Both are available: ``bpe: subword-nmt`` (default, ``bpe_merges``) or ``bpe:
    none`` with ``dict_min_count`` to prune rare words.
    """
    src_lang, tgt_lang = opts["src_lang"], opts["tgt_lang"]
    detok = Postprocessor(tgt_lang, "none")
    text = _Text({}, {}, {}, {})
    for split in SPLITS:
        src = [_squeeze(s) for s in _read_lines(paths[f"{split}.{src_lang}"])]
        tgt = [_squeeze(t) for t in _read_lines(paths[f"{split}.{tgt_lang}"])]
        _pairs("iwslt15_en_vi", src, tgt, _IWSLT15_FILES[split])
        if split == "train":
            limit = opts["max_train_sentences"]
            src, tgt = _head(src, limit), _head(tgt, limit)
        text.ref_detok[split] = [] if split == "train" else [detok.detokenize(t) for t in tgt]
        if opts["lowercase"]:
            src, tgt = [s.lower() for s in src], [t.lower() for t in tgt]
        text.src[split], text.tgt[split] = src, tgt
        text.counts[split] = {"input": len(src)}
    return text


# wmt14 --------------------------------------------------------------------------------------------
_WMT14_WHERE = (
    "Lay the files out as prepare-wmt14en2de.sh's orig/ folder: training/europarl-v7.de-en.L "
    "(training-parallel-europarl-v7.tgz), commoncrawl.de-en.L (training-parallel-commoncrawl.tgz), "
    "training/news-commentary-v12.de-en.L (training-parallel-nc-v12.tgz; v9 with data.icml17) and "
    "test-full/newstest2014-deen-{src,ref}.L.sgm (test-full.tgz), from statmt.org."
)


def _wmt14_corpora(opts: dict[str, Any]) -> tuple[str, ...]:
    nc = "news-commentary-v9" if opts["icml17"] else "news-commentary-v12"
    return ("training/europarl-v7.de-en", "commoncrawl.de-en", f"training/{nc}.de-en")


def _wmt14_inputs(opts: dict[str, Any], data_root: Path) -> dict[str, Path]:
    raw = _raw_dir(opts, data_root, "wmt14_en_de", _WMT14_WHERE)
    paths = {}
    for lang in ("en", "de"):
        for corpus in _wmt14_corpora(opts):
            paths[f"{corpus}.{lang}"] = raw / f"{corpus}.{lang}"
        role = "src" if lang == opts["src_lang"] else "ref"
        paths[f"test.{lang}"] = raw / "test-full" / f"newstest2014-deen-{role}.{lang}.sgm"
    for path in paths.values():
        _need(path, "wmt14_en_de", _WMT14_WHERE)
    return paths


def _wmt14_read(opts: dict[str, Any], paths: dict[str, Path]) -> _Text:
    """fairseq's ``prepare-wmt14en2de.sh``, step by step:

    * train: europarl-v7 + commoncrawl + news-commentary-v12 (v9 with ``data.icml17``),
      ``normalize-punctuation.perl L``, ``remove-non-printing-char.perl``, ``tokenizer.perl -a``;
      valid = the lines ``awk 'NR%100 == 0'`` selects (1-based), train = the rest;
    * test: the ``<seg>`` texts of ``newstest2014-deen-{src,ref}.L.sgm``, ’ mapped to ',
      ``tokenizer.perl -a`` (no punctuation normalization, as in the script);
    * BPE (40000 merges) learned on train, then ``clean-corpus-n.perl -ratio 1.5 ... 1 250`` on the
      BPE'd train and valid (the test is not cleaned).  Cased unless ``data.lowercase``.

    Expect hours: sacremoses and subword-nmt run in one Python process (the script uses 8 Moses
    threads).  ``max_train_sentences`` takes the first N lines of the concatenated corpora.
    """
    src_lang, tgt_lang = opts["src_lang"], opts["tgt_lang"]
    limit = opts["max_train_sentences"]
    text = _Text({}, {}, {}, {}, post_bpe_clean=(1.5, 1, 250, ("train", "valid")))
    sides: dict[str, list[str]] = {}
    for lang in (src_lang, tgt_lang):
        mover = _Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                       normalize=True, remove_non_printing=True)
        lines: list[str] = []
        for corpus in _wmt14_corpora(opts):
            if limit is not None and len(lines) >= limit:
                break
            corpus_lines = _read_lines(paths[f"{corpus}.{lang}"])
            if limit is not None:
                corpus_lines = corpus_lines[: limit - len(lines)]
            lines.extend(mover(line) for line in corpus_lines)
        sides[lang] = lines
    _pairs("wmt14_en_de", sides[src_lang], sides[tgt_lang], "the training corpora")
    n = len(sides[src_lang])
    is_valid = [(i + 1) % 100 == 0 for i in range(n)]
    for split, want in (("train", False), ("valid", True)):
        text.src[split] = [s for s, v in zip(sides[src_lang], is_valid, strict=True) if v == want]
        text.tgt[split] = [t for t, v in zip(sides[tgt_lang], is_valid, strict=True) if v == want]
        text.counts[split] = {"input": len(text.src[split])}
    text.counts["valid"]["carved_from_train_every"] = 100
    text.ref_detok["train"] = []
    detok = Postprocessor(tgt_lang, "none")
    text.ref_detok["valid"] = [detok.detokenize(t) for t in text.tgt["valid"]]
    for lang, side in ((src_lang, "src"), (tgt_lang, "tgt")):
        mover = _Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                       normalize=False)
        raw = _seg_texts(paths[f"test.{lang}"])
        getattr(text, side)["test"] = [mover(seg.replace("\u2019", "'")) for seg in raw]
        if side == "tgt":
            text.ref_detok["test"] = raw
    _pairs("wmt14_en_de", text.src["test"], text.tgt["test"], "newstest2014")
    text.counts["test"] = {"input": len(text.src["test"])}
    if opts["lowercase"]:
        for split in SPLITS:
            text.src[split] = [s.lower() for s in text.src[split]]
            text.tgt[split] = [t.lower() for t in text.tgt[split]]
    return text


_RECIPES: dict[str, _Recipe] = {
    r.name: r
    for r in (
        _Recipe("multi30k", MULTI30K_LANGS, "de", lowercase=True, bpe_merges=8000, escape=False,
                aggressive=False, inputs=_multi30k_inputs, read=_multi30k_read,
                registered_inputs=True,
                protocol="Multi30k task 1 (val / test2016 flickr), official preprocessing with "
                "sacremoses (lowercase, punctuation normalization, tokenizer without entities)"),
        _Recipe("iwslt14_de_en", ("de", "en"), "de", lowercase=True, bpe_merges=10000,
                escape=True, aggressive=False, inputs=_iwslt14_inputs, read=_iwslt14_read,
                protocol="IWSLT14 fairseq prepare-iwslt14.sh (Moses tokenizer, clean 1.5/175, "
                "lowercase, valid = every 23rd train line, test = dev2010+dev2012+tst2010-2012)"),
        _Recipe("iwslt15_en_vi", ("en", "vi"), "en", lowercase=False, bpe_merges=10000,
                escape=True, aggressive=False, inputs=_iwslt15_inputs, read=_iwslt15_read,
                protocol="IWSLT15 Stanford NMT files (pre-tokenized, cased; valid tst2012, test "
                "tst2013)"),
        _Recipe("wmt14_en_de", ("en", "de"), "en", lowercase=False, bpe_merges=40000,
                escape=True, aggressive=True, inputs=_wmt14_inputs, read=_wmt14_read,
                protocol="WMT14 fairseq prepare-wmt14en2de.sh (valid = every 100th train line, "
                "test newstest2014, BPE 40k, clean 1.5/250 after BPE)"),
    )
}


# --- options --------------------------------------------------------------------------------------
def _bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"data.{key} must be true or false, got {value!r}")
    return value


def _int(cfg: Mapping[str, Any], key: str, default: int | None, minimum: int = 1) -> int | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"data.{key} must be an int >= {minimum} (or null), got {value!r}")
    return value


def _ratio(cfg: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
        raise ValueError(f"data.{key} must be a number >= 1 (or null), got {value!r}")
    return float(value)


def _resolve_options(data_cfg: Mapping[str, Any]) -> tuple[_Recipe, dict[str, Any]]:
    """The recipe and every option that shapes its output, defaults filled in.  Keys of the
    ``data:`` section this module does not use (batching, cache_dir) are ignored."""
    name = data_cfg.get("name")
    if name not in _RECIPES:
        raise ValueError(f"unknown MT recipe data.name={name!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    recipe = _RECIPES[name]
    src = data_cfg.get("src_lang") or recipe.default_src
    tgt = data_cfg.get("tgt_lang") or next(lang for lang in recipe.langs if lang != src)
    if {src, tgt} != set(recipe.langs):
        raise ValueError(f"{name}: src_lang/tgt_lang must be {' and '.join(recipe.langs)} in "
                         f"either order, got {src!r} -> {tgt!r}")
    bpe = data_cfg.get("bpe") or "subword-nmt"
    if bpe not in BPE_METHODS:
        raise ValueError(f"data.bpe must be one of {', '.join(BPE_METHODS)}, got {bpe!r}")
    opts: dict[str, Any] = {
        "name": name,
        "src_lang": src,
        "tgt_lang": tgt,
        "lowercase": _bool(data_cfg, "lowercase", recipe.lowercase),
        "bpe": bpe,
        "bpe_merges": _int(data_cfg, "bpe_merges", recipe.bpe_merges) if bpe == "subword-nmt"
        else None,
        "spm_vocab_size": _int(data_cfg, "spm_vocab_size", 8000, minimum=8)
        if bpe == "sentencepiece" else None,
        "max_len": _int(data_cfg, "max_len", None),
        "len_ratio": _ratio(data_cfg, "len_ratio", None),
        "dict_min_count": _int(data_cfg, "dict_min_count", 1),
        "max_train_sentences": _int(data_cfg, "max_train_sentences", None),
        "moses_escape": _bool(data_cfg, "moses_escape", recipe.escape),
        "moses_aggressive": _bool(data_cfg, "moses_aggressive", recipe.aggressive),
    }
    if name == "iwslt14_de_en":
        opts["clean_ratio"] = _ratio(data_cfg, "clean_ratio", 1.5)
        opts["clean_max_len"] = _int(data_cfg, "clean_max_len", 175)
    if name == "wmt14_en_de":
        opts["icml17"] = _bool(data_cfg, "icml17", False)
    # Not part of the output (the cache key uses file hashes instead of paths):
    opts["raw_dir"] = data_cfg.get("raw_dir")
    opts["download"] = _bool(data_cfg, "download", False)
    return recipe, opts


# (path, size, mtime_ns) -> sha256, so a second prepare_corpus call does not re-hash big files.
_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_of(path)
    return _HASHES[key]


def _cache_key(opts: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    shaping = {k: v for k, v in opts.items() if k not in ("raw_dir", "download")}
    payload = json.dumps({"version": PREP_VERSION, "options": shaping, "inputs": dict(inputs)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# --- BPE ------------------------------------------------------------------------------------------
class _Segmenter:
    """Learns joint subwords on the training text (both sides) and applies them to a line."""

    def __init__(self, opts: Mapping[str, Any], train_lines: Sequence[str], directory: Path):
        self.method = opts["bpe"]
        self.learned = 0
        if self.method == "subword-nmt":
            from subword_nmt.apply_bpe import BPE
            from subword_nmt.learn_bpe import learn_bpe

            vocab: Counter[str] = Counter()
            for line in train_lines:
                vocab.update(line.split())
            codes = io.StringIO()
            # learn_bpe draws a tqdm bar and reports an early stop on stderr: keep the log clean
            # and record the number of merges actually learned instead.
            with contextlib.redirect_stderr(io.StringIO()):
                learn_bpe((f"{w} {c}" for w, c in vocab.items()), codes, opts["bpe_merges"],
                          is_dict=True)
            atomic_write_text(directory / "bpe.codes", codes.getvalue())
            self.learned = codes.getvalue().count("\n") - 1  # minus the "#version" line
            codes.seek(0)
            self._bpe = BPE(codes)
        elif self.method == "sentencepiece":
            spm = _import_sentencepiece()
            model = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(train_lines), model_writer=model,
                vocab_size=opts["spm_vocab_size"], model_type="bpe", character_coverage=1.0,
                # identity: the pieces must join back to exactly the tokenized text
                normalization_rule_name="identity", hard_vocab_limit=False,
                bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, num_threads=1, minloglevel=2,
            )
            atomic_write_bytes(directory / "spm.model", model.getvalue())
            self._spm = spm.SentencePieceProcessor(model_proto=model.getvalue())
            self.learned = int(self._spm.get_piece_size())

    def __call__(self, line: str) -> str:
        if self.method == "subword-nmt":
            return " ".join(self._bpe.segment_tokens(line.split()))
        if self.method == "sentencepiece":
            return " ".join(self._spm.encode(line, out_type=str))
        return line


def _import_sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError("data.bpe: sentencepiece needs the sentencepiece package "
                          "(pip install sentencepiece); or use bpe: subword-nmt") from exc
    return sentencepiece


# --- prepare --------------------------------------------------------------------------------------
_FORMAT = 1  # layout of corpus.pt


def prepare_corpus(data_cfg: Mapping[str, Any], data_root: Path, cache_dir: Path) -> PreparedCorpus:
    """The recipe ``data_cfg["name"]``, from ``cache_dir`` when an identical preparation exists.

    The cache folder ``<cache_dir>/<recipe>-<key>/`` holds ``corpus.pt`` (ids, references, info;
    loads with ``weights_only=True``), ``dict.txt``, the BPE codes (``bpe.codes`` or
    ``spm.model``) and ``info.json``.  The key hashes the options, the inputs' sha256 and
    :data:`PREP_VERSION`, so a changed option or file gets its own folder.
    """
    recipe, opts = _resolve_options(data_cfg)
    data_root, cache_dir = Path(data_root).expanduser(), Path(cache_dir).expanduser()
    paths = recipe.inputs(opts, data_root)
    if recipe.registered_inputs:  # require_dataset has verified them against the registry
        hashes = {role: _MULTI30K_SHA256[p.name] for role, p in paths.items()}
    else:
        hashes = {role: _file_sha256(p) for role, p in paths.items()}
    key = _cache_key(opts, hashes)
    directory = cache_dir / f"{recipe.name}-{key}"
    corpus_file = directory / "corpus.pt"
    if corpus_file.exists():
        corpus = _load(corpus_file, key)
        corpus.info.update(from_cache=True, cache_dir=str(directory))
        return corpus
    directory.mkdir(parents=True, exist_ok=True)
    corpus = _prepare(recipe, opts, paths, hashes, directory)
    corpus.info["cache_key"] = key
    corpus.info["cache_dir"] = str(directory)
    corpus.dictionary.save(directory / "dict.txt")
    atomic_write_text(directory / "info.json", json.dumps(corpus.info, indent=1) + "\n")
    _save(corpus, corpus_file, key)  # last: its existence marks a complete preparation
    corpus.info["from_cache"] = False
    return corpus


def _prepare(recipe: _Recipe, opts: dict[str, Any], paths: dict[str, Path],
             hashes: dict[str, str], directory: Path) -> PreparedCorpus:
    text = recipe.read(opts, paths)
    segment = _Segmenter(opts, [*text.src["train"], *text.tgt["train"]], directory)
    bpe_src = {s: [segment(line) for line in text.src[s]] for s in SPLITS}
    bpe_tgt = {s: [segment(line) for line in text.tgt[s]] for s in SPLITS}
    ref_tok = {s: list(text.tgt[s]) for s in SPLITS}
    ref_detok = {s: list(text.ref_detok[s]) for s in SPLITS}
    counts = text.counts

    def keep(split: str, indices: list[int]) -> None:
        for table in (bpe_src, bpe_tgt, ref_tok):
            table[split] = [table[split][i] for i in indices]
        if ref_detok[split]:
            ref_detok[split] = [ref_detok[split][i] for i in indices]

    if text.post_bpe_clean is not None:  # wmt14: clean-corpus-n on the BPE'd text
        ratio, lo, hi, clean_splits = text.post_bpe_clean
        for split in clean_splits:
            kept, bpe_src[split], bpe_tgt[split] = clean_corpus(
                bpe_src[split], bpe_tgt[split], ratio=ratio, min_len=lo, max_len=hi)
            ref_tok[split] = [ref_tok[split][i] for i in kept]
            if ref_detok[split]:
                ref_detok[split] = [ref_detok[split][i] for i in kept]
            counts[split]["after_bpe_clean"] = len(kept)

    # The training filter: empty sides, then data.max_len and data.len_ratio on BPE tokens.
    lengths = [(len(s.split()), len(t.split())) for s, t in zip(bpe_src["train"], bpe_tgt["train"],
                                                                 strict=True)]
    empty = [i for i, (a, b) in enumerate(lengths) if a == 0 or b == 0]
    too_long = [i for i, (a, b) in enumerate(lengths) if a and b and opts["max_len"] is not None
                and max(a, b) > opts["max_len"]]
    reject = set(empty) | set(too_long)
    bad_ratio = [i for i, (a, b) in enumerate(lengths) if i not in reject
                 and opts["len_ratio"] is not None and max(a / b, b / a) > opts["len_ratio"]]
    reject |= set(bad_ratio)
    keep("train", [i for i in range(len(lengths)) if i not in reject])
    counts["train"].update(dropped_empty=len(empty), dropped_max_len=len(too_long),
                           dropped_len_ratio=len(bad_ratio))
    for split in SPLITS:
        counts[split]["kept"] = len(bpe_src[split])

    dictionary = Dictionary.build([*bpe_src["train"], *bpe_tgt["train"]],
                                  min_count=opts["dict_min_count"])
    splits = {}
    for split in SPLITS:
        splits[split] = SplitData(
            src=[torch.tensor(dictionary.encode(line), dtype=torch.int64)
                 for line in bpe_src[split]],
            tgt=[torch.tensor(dictionary.encode(line), dtype=torch.int64)
                 for line in bpe_tgt[split]],
            ref_tok=ref_tok[split] if split != "train" else [],
            ref_detok=ref_detok[split] if split != "train" else [],
        )
    direction = f"{opts['src_lang']}->{opts['tgt_lang']}"
    bpe_desc = {"subword-nmt": f"joint subword-nmt BPE, {opts['bpe_merges']} merges",
                "sentencepiece": f"joint sentencepiece BPE, vocab {opts['spm_vocab_size']}",
                "none": "words (no subwords)"}[opts["bpe"]]
    info: dict[str, Any] = {
        "recipe": recipe.name,
        "direction": direction,
        "protocol": f"{recipe.protocol}; {'lower-cased' if opts['lowercase'] else 'cased'}; "
        f"{bpe_desc}",
        "lowercase": opts["lowercase"],
        "moses": {"escape": opts["moses_escape"], "aggressive_dash_splits":
                  opts["moses_aggressive"]},
        "bpe": {"method": opts["bpe"], "merges": opts["bpe_merges"],
                "spm_vocab_size": opts["spm_vocab_size"], "learned": segment.learned},
        "vocab_size": len(dictionary),
        "sentences": counts,
        "filters": {"max_len": opts["max_len"], "len_ratio": opts["len_ratio"],
                    "dict_min_count": opts["dict_min_count"],
                    "max_train_sentences": opts["max_train_sentences"]},
        "options": {k: v for k, v in opts.items() if k not in ("raw_dir", "download")},
        "inputs": {role: {"path": str(p.resolve()), "sha256": hashes[role]}
                   for role, p in paths.items()},
        "prep_version": PREP_VERSION,
    }
    return PreparedCorpus(dictionary, splits, opts["src_lang"], opts["tgt_lang"], info)


def _flatten(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)
    flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.int64)
    return flat.to(torch.int32), lengths


def _unflatten(flat: Tensor, lengths: Tensor) -> list[Tensor]:
    return list(torch.split(flat.to(torch.int64), lengths.tolist())) if lengths.numel() else []


def _save(corpus: PreparedCorpus, path: Path, key: str) -> None:
    """One flat int32 tensor per side and split plus lengths: a few large tensors save and load
    far faster than one per sentence, and stay plain data for ``weights_only=True``."""
    splits = {}
    for name, data in corpus.splits.items():
        src, src_len = _flatten(data.src)
        tgt, tgt_len = _flatten(data.tgt)
        splits[name] = {"src": src, "src_lengths": src_len, "tgt": tgt, "tgt_lengths": tgt_len,
                        "ref_tok": data.ref_tok, "ref_detok": data.ref_detok}
    d = corpus.dictionary
    atomic_save({"format": _FORMAT, "key": key, "src_lang": corpus.src_lang,
                 "tgt_lang": corpus.tgt_lang, "info": corpus.info,
                 "dictionary": {"tokens": d.symbols[len(SPECIALS):],
                                "counts": d.counts[len(SPECIALS):]},
                 "splits": splits}, path)


def _load(path: Path, key: str) -> PreparedCorpus:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read the prepared MT corpus {path} ({exc}); delete "
                           f"{path.parent} to prepare it again") from exc
    if blob.get("format") != _FORMAT or blob.get("key") != key:
        raise RuntimeError(f"{path} has format {blob.get('format')!r} and key {blob.get('key')!r}"
                           f", expected {_FORMAT} and {key}; delete {path.parent} to prepare it "
                           f"again")
    dictionary = Dictionary(blob["dictionary"]["tokens"], blob["dictionary"]["counts"])
    splits = {
        name: SplitData(_unflatten(s["src"], s["src_lengths"]),
                        _unflatten(s["tgt"], s["tgt_lengths"]),
                        list(s["ref_tok"]), list(s["ref_detok"]))
        for name, s in blob["splits"].items()
    }
    return PreparedCorpus(dictionary, splits, blob["src_lang"], blob["tgt_lang"], blob["info"])


# --- hypotheses to text --------------------------------------------------------------------------
class Postprocessor:
    """A decoded hypothesis (dictionary tokens joined by spaces) to the two texts BLEU needs:
    :meth:`remove_bpe` gives the tokenized text (tokenized BLEU), :meth:`detokenize` the plain
    text (sacreBLEU)."""

    def __init__(self, tgt_lang: str, bpe: str = "subword-nmt") -> None:
        if bpe not in BPE_METHODS:
            raise ValueError(f"bpe must be one of {', '.join(BPE_METHODS)}, got {bpe!r}")
        from sacremoses import MosesDetokenizer

        self.tgt_lang, self.bpe = tgt_lang, bpe
        self._detokenizer = MosesDetokenizer(tgt_lang)

    def remove_bpe(self, line: str) -> str:
        """subword-nmt: join ``@@ `` continuations (fairseq's ``--remove-bpe``); sentencepiece:
        join the pieces and turn ``▁`` back into spaces; none: unchanged."""
        if self.bpe == "subword-nmt":
            return _squeeze((line + " ").replace("@@ ", ""))
        if self.bpe == "sentencepiece":
            return _squeeze(line.replace(" ", "").replace("\u2581", " "))
        return _squeeze(line)

    def detokenize(self, tokenized: str) -> str:
        """sacremoses ``MosesDetokenizer(tgt_lang)``, entities (``&apos;``...) unescaped."""
        return self._detokenizer.detokenize(tokenized.split())

    def __call__(self, line: str) -> tuple[str, str]:
        """``(tokenized, detokenized)`` for one hypothesis."""
        tokenized = self.remove_bpe(line)
        return tokenized, self.detokenize(tokenized)


# --- BLEU -----------------------------------------------------------------------------------------
STAT_KEYS = (*(f"correct_{n}" for n in range(1, 5)), *(f"total_{n}" for n in range(1, 5)),
             "sys_len", "ref_len")


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps and refs must be lists of sentences, not one string")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def bleu_statistics(hyps: Sequence[str], refs: Sequence[str], *, tokenize: str,
                    lowercase: bool) -> dict[str, float]:
    """BLEU's additive sufficient statistics (sacreBLEU's, one reference per sentence):
    ``correct_n``/``total_n`` n-gram matches and counts (n = 1..4), ``sys_len``, ``ref_len``.
    Sums over shards are the statistics of the union; :func:`bleu_from_statistics` scores them.
    ``tokenize="none"`` is tokenized BLEU's setting, ``"13a"`` sacreBLEU's."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hyps, refs)
    if not hyps:
        return dict.fromkeys(STAT_KEYS, 0.0)
    metric = BLEU(tokenize=tokenize, lowercase=lowercase, force=True, smooth_method="none")
    score = metric.corpus_score(list(hyps), [list(refs)])
    stats = {f"correct_{n + 1}": float(c) for n, c in enumerate(score.counts)}
    stats.update({f"total_{n + 1}": float(t) for n, t in enumerate(score.totals)})
    stats.update(sys_len=float(score.sys_len), ref_len=float(score.ref_len))
    return stats


def bleu_from_statistics(stats: Mapping[str, float], *, smooth_method: str = "none") -> float:
    """BLEU-4 from (summed) :func:`bleu_statistics`: geometric mean of the four precisions times
    the brevity penalty, no smoothing by default (multi-bleu); ``smooth_method=
    SACREBLEU_SMOOTH`` gives sacreBLEU's default.  0 when any precision is 0 (unsmoothed)."""
    from sacrebleu.metrics import BLEU

    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"BLEU statistics lack {', '.join(missing)}; got {sorted(stats)}")
    correct = [round(float(stats[f"correct_{n}"])) for n in range(1, 5)]
    total = [round(float(stats[f"total_{n}"])) for n in range(1, 5)]
    return float(BLEU.compute_bleu(correct, total, round(float(stats["sys_len"])),
                                   round(float(stats["ref_len"])),
                                   smooth_method=smooth_method).score)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Tokenized BLEU (fairseq ``--remove-bpe`` / multi-bleu): the text is taken as tokenized
    (sacreBLEU ``tokenize="none"``, ``force=True``), no smoothing, case-sensitive as given."""
    return bleu_from_statistics(bleu_statistics(hyps, refs, tokenize="none", lowercase=False))


def sacrebleu_detok(hyps: Sequence[str], refs: Sequence[str], *,
                    lowercase: bool) -> tuple[float, str]:
    """Detokenized sacreBLEU (13a tokenizer, sacreBLEU's default smoothing) and its signature."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hyps, refs)
    if not hyps:
        return 0.0, sacrebleu_signature(lowercase=lowercase)
    metric = BLEU(tokenize="13a", lowercase=lowercase, smooth_method=SACREBLEU_SMOOTH)
    score = metric.corpus_score(list(hyps), [list(refs)])
    return float(score.score), str(metric.get_signature())


def sacrebleu_signature(*, lowercase: bool) -> str:
    """The signature :func:`sacrebleu_detok` reports, e.g.
    ``nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0``."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="13a", lowercase=lowercase, smooth_method=SACREBLEU_SMOOTH)
    metric.corpus_score(["x"], [["x"]])  # the signature needs the number of references
    return str(metric.get_signature())
