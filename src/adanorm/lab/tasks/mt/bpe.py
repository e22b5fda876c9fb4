"""Joint subwords learned on the training text of both sides: subword-nmt BPE, sentencepiece BPE
or none (words)."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["BPE_METHODS", "Segmenter"]

BPE_METHODS = ("subword-nmt", "sentencepiece", "none")


class Segmenter:
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
