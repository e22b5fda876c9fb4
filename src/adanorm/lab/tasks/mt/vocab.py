"""The joined source+target vocabulary of the MT task (fairseq's ``dict.txt`` conventions)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence

from torch import Tensor

from ...checkpoint import atomic_write_text

__all__ = ["SPECIALS", "Dictionary"]

#: The special symbols and their ids (pad=0, bos=1, eos=2, unk=3).
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


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
