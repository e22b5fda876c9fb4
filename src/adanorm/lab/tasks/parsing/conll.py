"""Gold sentences from CoNLL-U (Universal Dependencies) and CoNLL-X (PTB converted to
dependencies) files, and the tree properties the oracle needs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Sentence", "read_conllu", "read_conllx", "is_projective", "root_count",
           "DEFAULT_PTB_PUNCT_TAGS"]

#: The usual PTB punctuation tags for "UAS without punctuation" (gold tags).
DEFAULT_PTB_PUNCT_TAGS = ("``", "''", ",", ".", ":")


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
