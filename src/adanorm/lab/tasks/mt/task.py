"""Machine translation (the paper's headline columns, §3.1) with every norm swappable.

Task, model and criterion in fairseq's split, without fairseq:

* **data** (:mod:`.data`, :mod:`.recipes`, :mod:`.bpe`): Moses tokenization, joint BPE, length
  filtering and a binarized cache per recipe (``multi30k``, ``iwslt14_de_en``,
  ``iwslt15_en_vi``, ``wmt14_en_de``);
* **batches by token count**: sentences sorted by length are cut into batches of at most
  ``data.max_tokens`` padded tokens (``sentences * max(src_len, tgt_len)``, fairseq's rule).  The
  batches are built once, so one dataset *example* is one such batch
  (:attr:`~adanorm.lab.task.Task.examples_are_batches`): the trainer shuffles them per epoch and
  gives each process one per micro-step, and ``optim.accum_steps`` is fairseq's
  ``--update-freq``.  ``data.batch_size`` and ``data.eval_batch_size`` (examples per micro-step
  in every other task) are refused: ``data.max_tokens`` and ``data.eval_max_tokens`` size the
  batches;
* **model** (:mod:`.model`): the encoder-decoder Transformer, every norm from ``make_norm``;
* **criterion**: label-smoothed cross-entropy (``model.label_smoothing``), the mean over the
  target tokens of each micro-batch;
* **validation** is the label-smoothed loss (fairseq's checkpoint criterion: the best checkpoint is
  the one with the lowest validation loss);
* **test** decodes with beam search (:mod:`.search`: ``generation.*``) and scores BLEU two ways
  (:mod:`.bleu`), each labelled where it is reported:

  - ``bleu``: *tokenized BLEU* — BPE removed, Moses-tokenized (and lower-cased when the recipe
    lower-cases) hypotheses against the equally processed references, BLEU-4 without smoothing
    as multi-bleu / fairseq's ``generate.py --remove-bpe`` report it: the number the paper
    reports;
  - ``sacrebleu``: *detokenized sacreBLEU* — hypotheses Moses-detokenized, against the raw
    references, with sacreBLEU's 13a tokenizer; its signature is in ``results.json``.

  The translations are written to the run directory (``translations.test.txt``, detokenized,
  and ``translations.test.tok.txt``, tokenized), in the order of the test set.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ...checkpoint import atomic_write_text
from ...data import data_root, user_cache_dir
from ...schema import NO_DEFAULT, Bool, DropoutRate, Float, Int, Sizes, Str, TaskSchema
from ...task import ChanceLevel, Stats, Task, register_task
from .batching import TokenBatches, batches_by_tokens
from .bleu import (
    SACREBLEU_SMOOTH,
    Postprocessor,
    bleu_from_statistics,
    bleu_statistics,
    sacrebleu_signature,
)
from .bpe import BPE_METHODS
from .data import PreparedCorpus, prepare_corpus, resolve_options
from .model import TransformerMT
from .search import SearchConfig, beam_search

__all__ = ["MTTask"]

# Prepared corpora per (recipe config, data root): preparing Multi30k takes a while.
_CORPORA: dict[tuple[str, str], PreparedCorpus] = {}


@register_task("mt")
class MTTask(Task):
    datasets = ("multi30k", "iwslt14_de_en", "iwslt15_en_vi", "wmt14_en_de")
    valid_metric = "loss"
    valid_mode = "min"
    test_metric = "bleu"
    test_metric_label = "tokenized BLEU"

    # Defaults: the paper preset (presets/mt/paper.yaml, the authors' IWSLT14 recipe).  Keys
    # whose default belongs to the recipe named by data.name (languages, lower-casing, BPE size,
    # Moses escaping) have NO_DEFAULT: absent means the recipe's value (recipes.RECIPE_BY_NAME).
    config_schema = TaskSchema(
        data={
            "src_lang": Str(NO_DEFAULT, "null: the recipe's", nullable=True),
            "tgt_lang": Str(NO_DEFAULT, "null: the other language of the recipe", nullable=True),
            "raw_dir": Str(None, "the extracted raw corpus (IWSLT, WMT)", nullable=True),
            "lowercase": Bool(NO_DEFAULT, "null: the recipe's", nullable=True),
            "bpe": Str("subword-nmt", choices=BPE_METHODS),
            "bpe_merges": Int(NO_DEFAULT, "joint BPE merges (default: the recipe's)", low=1),
            "spm_vocab_size": Int(8000, "bpe: sentencepiece only", low=8),
            "dict_min_count": Int(1, low=1),
            "moses_escape": Bool(NO_DEFAULT, "null: the recipe's", nullable=True),
            "moses_aggressive": Bool(NO_DEFAULT, "null: the recipe's", nullable=True),
            "clean_ratio": Float(1.5, "iwslt14_de_en only", low=1.0, nullable=True),
            "clean_max_len": Int(175, "iwslt14_de_en only", low=1, nullable=True),
            "icml17": Bool(False, "wmt14_en_de only"),
            "max_len": Int(None, "extra train filter in BPE tokens", low=1, nullable=True),
            "len_ratio": Float(None, low=1.0, nullable=True),
            "max_train_sentences": Int(None, low=1, nullable=True),
            "cache_dir": Str(None, "null or empty: <user cache>/mt", nullable=True),
            "max_tokens": Int(4096, "padded tokens per micro-batch (fairseq --max-tokens)",
                              low=1),
            "eval_max_tokens": Int(4096, low=1),
            "decode_max_sentences": Int(128, low=1),
            "download": Bool(False, "multi30k only: fetch missing files (sha256-checked)"),
        },
        model={
            **Sizes(d_model=512, d_ffn=1024, n_head=4, enc_layers=6, dec_layers=6),
            "dropout": DropoutRate(0.3),
            "attention_dropout": DropoutRate(0.1),
            "activation_dropout": DropoutRate(0.1),
            "pre_norm": Bool(True),
            "share_embeddings": Bool(True),
            "label_smoothing": DropoutRate(0.1, "in [0, 1)"),
            "max_positions": Int(1024, low=1),
        },
        generation={
            "beam": Int(5, low=1),
            "lenpen": Float(1.0),
            "max_len_a": Float(0.0, "max length = a * source length + b", low=0.0),
            "max_len_b": Int(200, low=1),
        },
        refused={
            "data.batch_size": "translation batches by tokens; set data.max_tokens (padded "
            "tokens per micro-batch and process) instead",
            "data.eval_batch_size": "translation batches by tokens; set data.eval_max_tokens "
            "instead",
        },
    )
    examples_are_batches = True

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        data = cfg["data"]
        resolve_options(data)  # the recipe's checks across keys (languages), before any data
        self.max_tokens = int(data["max_tokens"])
        self.eval_max_tokens = int(data["eval_max_tokens"])
        self.decode_max_sentences = int(data["decode_max_sentences"])
        gen = cfg["generation"]
        self.search = SearchConfig(
            beam=int(gen["beam"]),
            lenpen=float(gen["lenpen"]),
            max_len_a=float(gen["max_len_a"]),
            max_len_b=int(gen["max_len_b"]),
        )
        self.label_smoothing = float(cfg["model"]["label_smoothing"])
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        self._corpus: PreparedCorpus | None = None
        self._translations: dict[int, tuple[str, str]] = {}
        self._postprocessor: Postprocessor | None = None

    # --- data -----------------------------------------------------------------------------------
    def corpus(self) -> PreparedCorpus:
        if self._corpus is None:
            root = data_root(self.data_dir)
            cache = Path(self.cfg["data"]["cache_dir"] or user_cache_dir() / "mt")
            key = (repr(sorted(self.cfg["data"].items())), str(root))
            if key not in _CORPORA:
                _CORPORA[key] = prepare_corpus(self.cfg["data"], root, cache)
            self._corpus = _CORPORA[key]
            c = self._corpus
            case = "lower-cased" if c.lowercase else "cased"
            self.test_metric_label = (
                f"tokenized BLEU ({c.src_lang}->{c.tgt_lang}, BPE removed, Moses-tokenized, "
                f"{case}; multi-bleu as fairseq --remove-bpe)"
            )
            print(f"mt: {self.dataset_name} {c.src_lang}->{c.tgt_lang}, "
                  f"{len(c.dictionary)} types (joined), "
                  + ", ".join(f"{k} {len(v.src)}" for k, v in c.splits.items()), file=sys.stderr)
        return self._corpus

    def _lengths(self, split: str) -> tuple[list[int], list[int]]:
        data = self.corpus().splits[split]
        # +1: the eos every source and target sequence ends with.
        return [len(s) + 1 for s in data.src], [len(t) + 1 for t in data.tgt]

    def dataset(self, split: str) -> Dataset:
        src_lengths, tgt_lengths = self._lengths(split)
        if split == "train":
            batches = batches_by_tokens(src_lengths, tgt_lengths, self.max_tokens)
        elif split == "valid":
            batches = batches_by_tokens(src_lengths, tgt_lengths, self.eval_max_tokens)
        else:  # decoding: by source length; beam search multiplies the batch by the beam
            order = sorted(range(len(src_lengths)), key=lambda i: (src_lengths[i], i))
            batches = batches_by_tokens(
                src_lengths, tgt_lengths, self.eval_max_tokens,
                max_sentences=self.decode_max_sentences, order=order,
            )
        return TokenBatches(batches)

    def _pad(self, sequences: list[Tensor]) -> Tensor:
        pad = self.corpus().dictionary.pad
        return nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad)

    def collate(self, examples: Any, split: str) -> dict[str, Any]:
        groups = [examples] if examples and isinstance(examples[0], int) else list(examples)
        indices = [i for group in groups for i in group]
        d = self.corpus().dictionary
        data = self.corpus().splits[split]
        eos = torch.tensor([d.eos])
        bos = torch.tensor([d.bos])
        src = self._pad([torch.cat([data.src[i], eos]) for i in indices])
        target = self._pad([torch.cat([data.tgt[i], eos]) for i in indices])
        prev = self._pad([torch.cat([bos, data.tgt[i]]) for i in indices])
        # Counted here, on the host, so that the loss never waits for the device to count them.
        return {"src": src, "prev": prev, "target": target,
                "index": torch.tensor(indices),
                "target_tokens": int(target.ne(d.pad).sum()),
                "src_tokens": int(src.ne(d.pad).sum())}

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["src"].shape[0])

    # --- model ----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m, d = self.cfg["model"], self.corpus().dictionary
        return TransformerMT(
            len(d), len(d), pad=d.pad, make_norm=self.make_norm,
            d_model=int(m["d_model"]), d_ffn=int(m["d_ffn"]), n_head=int(m["n_head"]),
            enc_layers=int(m["enc_layers"]), dec_layers=int(m["dec_layers"]),
            dropout=float(m["dropout"]),
            attention_dropout=float(m["attention_dropout"]),
            activation_dropout=float(m["activation_dropout"]),
            pre_norm=bool(m["pre_norm"]),
            share_embeddings=bool(m["share_embeddings"]),
            max_positions=int(m["max_positions"]),
        )

    # --- criterion ------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Stats]:
        pad = self.corpus().dictionary.pad
        src_padded = batch["src_tokens"] < batch["src"].numel()
        logits = model(batch["src"], batch["prev"], src_padded=src_padded).float()
        flat_logits, target = logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1)
        # PyTorch's label smoothing spreads eps over all V classes, as fairseq's
        # label_smoothed_cross_entropy does (eps_i = eps / V).
        smoothed = F.cross_entropy(flat_logits, target, ignore_index=pad, reduction="sum",
                                   label_smoothing=self.label_smoothing)
        with torch.no_grad():
            nll = F.cross_entropy(flat_logits, target, ignore_index=pad, reduction="sum")
        tokens = batch["target_tokens"]
        stats = {
            "loss_sum": smoothed.detach().double(), "nll_sum": nll.double(),
            "tokens": float(tokens), "src_tokens": float(batch["src_tokens"]),
            "sentences": float(batch["src"].shape[0]),
        }
        return smoothed / max(tokens, 1), stats

    def chance_level(self) -> ChanceLevel:
        """The constant target distribution with the lowest label-smoothed train loss,
        ``q = (1 - eps) * f + eps / V`` with ``f`` the train split's target-token frequencies
        (eos included; add-one smoothed when eps = 0), scored as the valid metric: the
        label-smoothed loss over the valid targets."""
        corpus = self.corpus()
        vocab, eos, eps = len(corpus.dictionary), corpus.dictionary.eos, self.label_smoothing

        def targets(split: str) -> Tensor:
            sentences = corpus.splits[split].tgt
            return torch.cat([*(t.reshape(-1).long() for t in sentences),
                              torch.full((len(sentences),), eos, dtype=torch.long)])

        counts = torch.bincount(targets("train"), minlength=vocab).double()
        if eps == 0.0:
            counts += 1.0
        log_q = torch.log((1.0 - eps) * counts / counts.sum() + eps / vocab)
        loss = (1.0 - eps) * -float(log_q[targets("valid")].mean()) + eps * -float(log_q.mean())
        return ChanceLevel("loss", loss, f"the best constant target-token distribution for the "
                                         f"label-smoothed loss (eps {eps:g}), fitted on train")

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        tokens = stats.get("tokens", 0.0)
        if tokens <= 0:
            raise ValueError("no target tokens were evaluated (empty split?)")
        nll = stats["nll_sum"] / tokens
        out = {"loss": stats["loss_sum"] / tokens, "nll_loss": nll, "ppl": math.exp(min(nll, 50)),
               "tokens": tokens, "sentences": stats.get("sentences", 0.0)}
        if "tok_sys_len" in stats:
            out["bleu"] = bleu_from_statistics(_unprefix(stats, "tok_"))
            out["sacrebleu"] = bleu_from_statistics(
                _unprefix(stats, "sacre_"), smooth_method=SACREBLEU_SMOOTH
            )
            out["hyp_ref_length_ratio"] = stats["tok_sys_len"] / max(stats["tok_ref_len"], 1.0)
        return out

    # --- evaluation -----------------------------------------------------------------------------
    def eval_batch_stats(self, model: nn.Module, batch: Mapping[str, Any], split: str) -> Stats:
        """Valid: the loss.  Test: the loss, then beam search and both BLEUs' statistics."""
        stats = self.loss(model, batch)[1]
        if split == "test":
            stats.update(self._translate(model, batch))
        return stats

    def _translate(self, model: nn.Module, batch: Mapping[str, Any]) -> Stats:
        corpus = self.corpus()
        d, test = corpus.dictionary, corpus.splits["test"]
        if self._postprocessor is None:
            self._postprocessor = corpus.postprocessor()
        post = self._postprocessor
        hypotheses = beam_search(model, batch["src"], bos=d.bos, eos=d.eos, cfg=self.search)
        indices = batch["index"].tolist()
        tok_hyps, detok_hyps = [], []
        for index, ids in zip(indices, hypotheses, strict=True):
            tokenized = post.remove_bpe(d.decode(ids))
            detokenized = post.detokenize(tokenized)
            self._translations[index] = (tokenized, detokenized)
            tok_hyps.append(tokenized)
            detok_hyps.append(detokenized)
        lowercase = corpus.lowercase
        tok = bleu_statistics(tok_hyps, [test.ref_tok[i] for i in indices],
                              tokenize="none", lowercase=False)
        sacre = bleu_statistics(detok_hyps, [test.ref_detok[i] for i in indices],
                                tokenize="13a", lowercase=lowercase)
        return {**{f"tok_{k}": v for k, v in tok.items()},
                **{f"sacre_{k}": v for k, v in sacre.items()}}

    # --- outputs --------------------------------------------------------------------------------
    def results_extra(self) -> dict[str, Any]:
        corpus = self.corpus()
        signature = sacrebleu_signature(lowercase=corpus.lowercase)
        return {
            "bleu_definitions": {
                "bleu": self.test_metric_label,
                "sacrebleu": f"detokenized sacreBLEU, signature {signature}",
            },
            "sacrebleu_signature": signature,
            "generation": {"beam": self.search.beam, "lenpen": self.search.lenpen,
                           "max_len_a": self.search.max_len_a,
                           "max_len_b": self.search.max_len_b},
            "data_info": corpus.info,
        }

    def write_artifacts(self, run_dir: Path) -> None:
        if not self._translations:
            return
        order = sorted(self._translations)
        atomic_write_text(run_dir / "translations.test.tok.txt",
                          "".join(self._translations[i][0] + "\n" for i in order))
        atomic_write_text(run_dir / "translations.test.txt",
                          "".join(self._translations[i][1] + "\n" for i in order))


def _unprefix(stats: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
