"""Dependency parsing with a Chen & Manning (2014) style feed-forward transition parser.

The paper's PTB column is "an MLP-based parser, 3 layers" (docs/paper.md §3.5).  Here:

* arc-standard transitions with a static oracle (:mod:`.transitions`; treebanks read by
  :mod:`.conll`, encoded and cached by :mod:`.data`, the MLP in :mod:`.model`);
* C&M's 48 features (18 words, 18 POS tags, 12 arc labels over s1..s3, b1..b3 and the leftmost /
  rightmost children of s1 and s2), each embedded and concatenated;
* **"3 layers" = three weight layers**: ``embeddings -> [Linear -> norm -> ReLU] x 2 -> Linear``,
  i.e. two normalized hidden layers and the softmax layer (``model.hidden_sizes`` sets the hidden
  layers; ``[200]`` gives C&M's literal input/hidden/softmax network with a single norm);
* training on the oracle's (configuration, transition) pairs of every training sentence the oracle
  can derive: non-projective sentences are dropped from *training* and counted;
* evaluation on *every* sentence by batched greedy decoding with legal-move masking, which always
  yields a projective single-rooted tree; UAS/LAS count every word, with and without punctuation.

Datasets: ``ewt`` (UD English-EWT v2.16, CoNLL-U, public; punctuation = gold UPOS ``PUNCT``) and
``ptb`` (your own PTB conversion in CoNLL-X; punctuation = gold tag in ``data.punct_tags``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...config import ConfigError
from ...data import data_root, require_dataset, user_cache_dir
from ...schema import (
    Bool,
    DropoutRate,
    Int,
    IntList,
    Sizes,
    Str,
    StrList,
    StrMap,
    TaskSchema,
)
from ...task import ChanceLevel, Stats, Task, TensorDataset, cross_entropy_stats, register_task
from . import conll
from . import data as pd
from . import transitions as arc_standard
from .model import MLPParser

__all__ = ["ParsingTask", "greedy_parse", "attachment_counts"]

PUNCT_RULES = {
    "ewt": "punctuation = gold UPOS PUNCT",
    "ptb": "punctuation = gold PTB tag in data.punct_tags",
}


# --- decoding and scoring -----------------------------------------------------------------------
def greedy_parse(
    model: nn.Module, sentences: Sequence[pd.EncodedSentence], num_labels: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Parse ``sentences`` together: every unfinished sentence makes one transition per model
    call, the best-scoring *legal* one.  Returns (heads, label indices) over words 1..n.

    The UNK label (index 0, never a training target) is never predicted.
    """
    device = next(model.parameters()).device
    states = [arc_standard.ParseState(len(s)) for s in sentences]
    words = [s.words.tolist() for s in sentences]
    tags = [s.tags.tolist() for s in sentences]
    num_transitions = 1 + 2 * num_labels
    unk_arcs = torch.zeros(num_transitions, dtype=torch.bool)
    unk_arcs[[1, 1 + num_labels]] = True
    active = [i for i, st in enumerate(states) if not st.terminal]
    while active:
        feats = torch.tensor(
            [arc_standard.extract_features(states[i], words[i], tags[i]) for i in active],
            dtype=torch.long,
        )
        legal = torch.tensor(
            [arc_standard.legal_moves(states[i]) for i in active], dtype=torch.bool
        )
        allowed = (
            torch.cat(
                [
                    legal[:, :1],
                    legal[:, 1:2].expand(-1, num_labels),
                    legal[:, 2:3].expand(-1, num_labels),
                ],
                dim=1,
            )
            & ~unk_arcs
        )
        scores = model(feats.to(device)).float().cpu()
        best = scores.masked_fill(~allowed, -math.inf).argmax(1).tolist()
        for i, transition in zip(active, best, strict=True):
            arc_standard.apply_transition(states[i], transition, num_labels)
        active = [i for i in active if not states[i].terminal]
    return [
        (np.asarray(st.heads[1:], dtype=np.int64), np.asarray(st.labels[1:], dtype=np.int64) - 1)
        for st in states
    ]


def attachment_counts(
    gold: Iterable[pd.EncodedSentence], predicted: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Stats:
    """Word counts and correct heads / heads+labels, over all words and over non-punctuation."""
    out = {"words": 0.0, "words_excl_punct": 0.0, "uas_incl": 0.0, "las_incl": 0.0}
    out.update({"uas_excl": 0.0, "las_excl": 0.0, "sentences": 0.0})
    for sent, (heads, labels) in zip(gold, predicted, strict=True):
        head_ok = heads == sent.heads
        both_ok = head_ok & (labels == sent.labels)
        keep = ~sent.punct
        out["words"] += len(sent)
        out["words_excl_punct"] += float(keep.sum())
        out["uas_incl"] += float(head_ok.sum())
        out["las_incl"] += float(both_ok.sum())
        out["uas_excl"] += float((head_ok & keep).sum())
        out["las_excl"] += float((both_ok & keep).sum())
        out["sentences"] += 1
    return out


def adjacent_attachment_uas(sentences: Iterable[pd.EncodedSentence], side: str) -> float:
    """UAS without punctuation (%) of heading every word by its neighbour on ``side``: a left
    chain (word i headed by i - 1, the first word by ROOT) or a right chain (word i by i + 1, the
    last word by ROOT), the parse that ignores the sentence's words."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    correct = counted = 0
    for sent in sentences:
        n = len(sent)
        positions = np.arange(1, n + 1)
        heads = positions - 1 if side == "left" else np.where(positions < n, positions + 1, 0)
        keep = ~np.asarray(sent.punct, dtype=bool)
        correct += int(((heads == np.asarray(sent.heads)) & keep).sum())
        counted += int(keep.sum())
    if not counted:
        raise ValueError("no non-punctuation words to score (empty split?)")
    return 100.0 * correct / counted


# --- the task -----------------------------------------------------------------------------------
_TREEBANKS: dict[str, tuple[pd.Vocab, dict[str, list[pd.EncodedSentence]], dict[str, int]]] = {}


class _Sentences(Dataset):
    """Evaluation examples: whole sentences (decoding needs them, not single transitions)."""

    def __init__(self, sentences: list[pd.EncodedSentence]) -> None:
        self.sentences = sentences

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> pd.EncodedSentence:
        return self.sentences[index]


def _cache_root() -> Path:
    return user_cache_dir() / "parsing-features"


@register_task("parsing")
class ParsingTask(Task):
    """Transition-based dependency parsing; valid metric: dev UAS without punctuation."""

    datasets = ("ewt", "ptb")
    valid_metric = "uas_excl_punct"
    valid_mode = "max"
    test_metric = "uas_excl_punct"
    test_metric_label = "UAS (%), punctuation excluded"

    # Defaults: the paper preset (presets/parsing/paper.yaml: Chen & Manning's sizes).
    config_schema = TaskSchema(
        data={
            "download": Bool(False, "ewt only: fetch missing files (sha256-checked)"),
            "pos_field": Str("auto", "auto = xpos for ewt, postag for ptb",
                             choices=("auto", "upos", "xpos", "cpostag", "postag")),
            "punct_tags": StrList(list(conll.DEFAULT_PTB_PUNCT_TAGS), "ptb only"),
            "ptb_dir": Str("", '"" = <data root>/ptb', nullable=True),
            "ptb_files": StrMap(
                {"train": "train.conllx", "valid": "dev.conllx", "test": "test.conllx"},
                keys=("train", "valid", "test"),
            ),
            "min_word_count": Int(2, "rarer training words share the UNK embedding", low=1),
            "lowercase": Bool(True),
            "cache_dir": Str("", '"" = $XDG_CACHE_HOME/adanorm/parsing-features',
                             nullable=True),
        },
        model={
            **Sizes(word_dim=50, tag_dim=50, label_dim=50),
            "hidden_sizes": IntList([200, 200], low=1),
            "activation": Str("relu", "relu | cube (Chen & Manning's)", choices=("relu", "cube")),
            "dropout": DropoutRate(0.5),
        },
    )

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        d = cfg["data"]
        if self.dataset_name == "ewt":
            rule = "gold UPOS PUNCT"
        else:
            rule = f"gold {self._pos_field()} tag in {{{' '.join(self._punct_tags())}}}"
        self.punct_rule = rule
        # An instance attribute: results.json then states the rule next to the number.
        self.test_metric_label = f"UAS (%), punctuation excluded ({rule})"
        self._min_word_count = int(d["min_word_count"])
        self._lowercase = bool(d["lowercase"])

    # --- configuration helpers ------------------------------------------------------------------
    def _pos_field(self) -> str:
        field = str(self.cfg["data"]["pos_field"])
        if field == "auto":
            return "xpos" if self.dataset_name == "ewt" else "postag"
        allowed = ("upos", "xpos") if self.dataset_name == "ewt" else ("cpostag", "postag")
        if field not in allowed:
            raise ConfigError(
                f"data.pos_field={field!r} is not valid for {self.dataset_name}; choose auto, "
                f"{' or '.join(allowed)}"
            )
        return field

    def _punct_tags(self) -> list[str]:
        tags = self.cfg["data"]["punct_tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"data.punct_tags must be a list of tag strings, got {tags!r}")
        return tags

    def _files(self) -> dict[str, Path]:
        d = self.cfg["data"]
        if self.dataset_name == "ewt":
            directory = require_dataset(
                "ewt", self.data_dir, download=bool(d["download"])
            )
            return {split: directory / name for split, (name, _) in pd.EWT_FILES.items()}
        directory = Path(d["ptb_dir"] or data_root(self.data_dir) / "ptb").expanduser()
        names = d["ptb_files"]
        files = {}
        for split, default in (
            ("train", "train.conllx"),
            ("valid", "dev.conllx"),
            ("test", "test.conllx"),
        ):
            path = directory / str(names.get(split, default))
            if not path.is_file():
                raise FileNotFoundError(
                    f"ptb: the {split} file {path} does not exist. The PTB is LDC-licensed and "
                    f"not downloadable: put your CoNLL-X conversion (e.g. Stanford dependencies "
                    f"of WSJ 02-21 / 22 / 23) at {directory} as train.conllx, dev.conllx and "
                    f"test.conllx, or set data.ptb_dir and data.ptb_files."
                )
            files[split] = path
        return files

    def treebank(self) -> tuple[pd.Vocab, dict[str, list[pd.EncodedSentence]], dict[str, int]]:
        """Vocab, encoded splits and counts: from this process's memory, else the feature cache
        on disk, else built from the treebank files (and cached)."""
        files = self._files()
        pos_field = self._pos_field()
        payload: dict[str, object] = {
            "dataset": self.dataset_name,
            "files": {s: pd.file_fingerprint(p) for s, p in files.items()},
            "pos_field": pos_field,
            "min_word_count": self._min_word_count,
            "lowercase": self._lowercase,
        }
        if self.dataset_name == "ptb":
            payload["punct_tags"] = self._punct_tags()
        key = pd.cache_key(payload)
        if key in _TREEBANKS:
            return _TREEBANKS[key]
        cache_dir = self.cfg["data"]["cache_dir"] or _cache_root()
        cache_file = Path(cache_dir).expanduser() / f"{self.dataset_name}-{key}.npz"
        loaded = None
        if cache_file.exists():
            try:
                loaded = pd.load_treebank(cache_file)
            except pd.CacheError as exc:
                print(f"parsing: rebuilding the unreadable feature cache ({exc})", file=sys.stderr)
        if loaded is None:
            if self.dataset_name == "ewt":
                raw = {s: conll.read_conllu(p, pos_field) for s, p in files.items()}
            else:
                punct = self._punct_tags()
                raw = {s: conll.read_conllx(p, pos_field, punct) for s, p in files.items()}
            loaded = pd.featurize_treebank(raw, self._min_word_count, self._lowercase)
            pd.save_treebank(cache_file, *loaded)
        info = loaded[2]
        print(
            f"parsing/{self.dataset_name}: train {info['train_sentences']} sentences, "
            f"{info['train_not_oracle_derivable']} dropped from training (non-projective or not "
            f"single-rooted), {info['train_transitions']} oracle transitions; valid "
            f"{info['valid_sentences']} / test {info['test_sentences']} sentences, all evaluated "
            f"({self.punct_rule}); features cached in {cache_file}",
            file=sys.stderr,
            flush=True,
        )
        _TREEBANKS[key] = loaded
        return loaded

    # --- Task interface -------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        if split not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, valid or test")
        _, splits, _ = self.treebank()
        if split == "train":
            usable = [s for s in splits["train"] if len(s.transitions)]
            features = np.concatenate([s.features for s in usable])
            transitions = np.concatenate([s.transitions for s in usable])
            return TensorDataset(torch.from_numpy(features), torch.from_numpy(transitions))
        return _Sentences(splits[split])

    def collate(self, examples: Any, split: str) -> Any:
        return examples  # a (features, transitions) batch, or a list of sentences

    def build_model(self) -> nn.Module:
        vocab, _, _ = self.treebank()
        m = self.cfg["model"]
        return MLPParser(
            vocab.num_words,
            vocab.num_tags,
            1 + vocab.num_labels,
            vocab.num_transitions,
            self.make_norm,
            word_dim=int(m["word_dim"]),
            tag_dim=int(m["tag_dim"]),
            label_dim=int(m["label_dim"]),
            hidden_sizes=list(m["hidden_sizes"]),
            activation=str(m["activation"]),
            dropout=float(m["dropout"]),
        )

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Stats]:
        features, transitions = batch
        return cross_entropy_stats(model(features), transitions)

    def eval_batch_stats(self, model: nn.Module, sentences: Any, split: str) -> Stats:
        """Oracle-transition loss (sentences the oracle can derive) and greedy-decoding UAS/LAS
        (all sentences)."""
        vocab, _, _ = self.treebank()
        device = next(model.parameters()).device
        # The loss's keys even for a batch without derivable sentences: every process must send
        # the same keys to the sum over processes.
        stats: Stats = {"loss_sum": 0.0, "correct": 0.0, "n": 0.0}
        derivable = [s for s in sentences if len(s.transitions)]
        if derivable:
            features = torch.from_numpy(np.concatenate([s.features for s in derivable]))
            gold = torch.from_numpy(np.concatenate([s.transitions for s in derivable]))
            stats = self.loss(model, (features.to(device), gold.to(device)))[1]
        predicted = greedy_parse(model, sentences, vocab.num_labels)
        return {**stats, **attachment_counts(sentences, predicted)}

    def chance_level(self) -> ChanceLevel:
        """Every word headed by its neighbour on one fixed side (see
        :func:`adjacent_attachment_uas`): the side that attaches more train words right, scored
        as the valid metric (UAS without punctuation)."""
        _, splits, _ = self.treebank()
        side = max(("left", "right"), key=lambda s: adjacent_attachment_uas(splits["train"], s))
        return ChanceLevel(
            "uas_excl_punct", adjacent_attachment_uas(splits["valid"], side),
            f"every word headed by its {side} neighbour (the side better on train)",
        )

    def metrics(self, stats: Mapping[str, float]) -> dict[str, float]:
        n = stats.get("n", 0.0)
        out = {
            "loss": stats["loss_sum"] / n if n else math.nan,
            "transition_acc": 100.0 * stats["correct"] / n if n else math.nan,
        }
        if "words" in stats:
            if stats["words"] <= 0:
                raise ValueError("no words were evaluated (empty split?)")
            excl = stats["words_excl_punct"]
            out.update(
                {
                    "uas_excl_punct": 100.0 * stats["uas_excl"] / excl if excl else math.nan,
                    "las_excl_punct": 100.0 * stats["las_excl"] / excl if excl else math.nan,
                    "uas_incl_punct": 100.0 * stats["uas_incl"] / stats["words"],
                    "las_incl_punct": 100.0 * stats["las_incl"] / stats["words"],
                    "words": stats["words"],
                    "words_excl_punct": excl,
                    "sentences": stats["sentences"],
                }
            )
        return out
