"""Text steps of the Moses scripts the MT recipes use: reading, whitespace squeezing, tokenizing
and ``clean-corpus-n.perl``, with sacremoses standing in for the perl scripts."""

from __future__ import annotations

import gzip
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["clean_corpus", "read_lines", "squeeze", "Moses"]


def read_lines(path: Path) -> list[str]:
    """UTF-8 lines split on ``\\n`` only (not ``str.splitlines``, which also breaks on U+0085 and
    U+2028 where Perl's line reading would not); ``.gz`` is decompressed."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        text = fh.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def squeeze(line: str) -> str:
    return " ".join(line.split())


def _remove_non_printing(line: str) -> str:
    """Moses ``remove-non-printing-char.perl``: every ``\\p{C}`` character becomes a space."""
    if line.isprintable():  # fast path: isprintable() is False for every category C character
        return line
    return "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in line)


class Moses:
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
        return squeeze(tokens)


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
        f, e = squeeze(f), squeeze(e)
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
