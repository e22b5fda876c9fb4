"""Hypotheses to text, and BLEU from additive statistics.

**Two BLEUs, always labelled.**  *Tokenized BLEU* scores BPE-removed, Moses-tokenized hypotheses
(:meth:`Postprocessor.remove_bpe`) against the tokenized references (lower-cased when the recipe
lower-cases) with no further tokenization and no smoothing: what ``multi-bleu.perl`` and fairseq's
``generate.py --remove-bpe`` print, the number the paper reports.  *Detokenized sacreBLEU* scores
Moses-detokenized hypotheses (:meth:`Postprocessor.detokenize`) against the raw references with
sacreBLEU's 13a tokenizer and smoothing :data:`SACREBLEU_SMOOTH`, labelled with
:func:`sacrebleu_signature`.  Both come from :func:`bleu_statistics` (``tokenize="none"`` and
``"13a"``), which are sums: shards and batches are scored apart and added, and
:func:`bleu_from_statistics` turns the totals into the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .bpe import BPE_METHODS
from .moses import squeeze

__all__ = ["SACREBLEU_SMOOTH", "STAT_KEYS", "Postprocessor", "bleu_statistics",
           "bleu_from_statistics", "sacrebleu_signature"]

#: sacreBLEU's default smoothing, which detokenized BLEU and its signature use.  Summed 13a
#: statistics reproduce that score with ``bleu_from_statistics(s, smooth_method=...)``.
SACREBLEU_SMOOTH = "exp"


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
            return squeeze((line + " ").replace("@@ ", ""))
        if self.bpe == "sentencepiece":
            return squeeze(line.replace(" ", "").replace("\u2581", " "))
        return squeeze(line)

    def detokenize(self, tokenized: str) -> str:
        """sacremoses ``MosesDetokenizer(tgt_lang)``, entities (``&apos;``...) unescaped."""
        return self._detokenizer.detokenize(tokenized.split())


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


def sacrebleu_signature(*, lowercase: bool) -> str:
    """The signature of detokenized sacreBLEU (13a, smoothing :data:`SACREBLEU_SMOOTH`), e.g.
    ``nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0``."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="13a", lowercase=lowercase, smooth_method=SACREBLEU_SMOOTH)
    metric.corpus_score(["x"], [["x"]])  # the signature needs the number of references
    return str(metric.get_signature())
