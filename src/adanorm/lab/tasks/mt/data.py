"""Machine-translation data: one recipe's text to BPE ids, with a cache.

``prepare_corpus(data_cfg, data_root, cache_dir)`` runs one *recipe* (``data_cfg["name"]``,
:mod:`.recipes`) and returns a :class:`PreparedCorpus`: a joined :class:`~.vocab.Dictionary`, the
three splits as int64 id tensors (no eos; the task appends it) and, for valid and test, the two
references BLEU needs (:mod:`.bleu`).  Every recipe ends the same way: joint BPE learned on the
training source and target together (:mod:`.bpe`), a length filter on train, the dictionary built
on train, and a cache keyed by the options, the sha256 of every input file and
:data:`PREP_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...checkpoint import atomic_save, atomic_write_text
from ...data import sha256_of
from .bleu import Postprocessor
from .bpe import BPE_METHODS, Segmenter
from .moses import clean_corpus
from .recipes import MULTI30K_SHA256, RECIPE_BY_NAME, RECIPES, SPLITS, Recipe
from .vocab import SPECIALS, Dictionary

__all__ = ["PREP_VERSION", "SplitData", "PreparedCorpus", "prepare_corpus", "resolve_options"]

#: Bump when a code change alters what a recipe produces: it is part of every cache key.
PREP_VERSION = 1


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


def resolve_options(data_cfg: Mapping[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and every option that shapes its output, defaults filled in.  Keys of the
    ``data:`` section this module does not use (batching, cache_dir) are ignored."""
    name = data_cfg.get("name")
    if name not in RECIPE_BY_NAME:
        raise ValueError(f"unknown MT recipe data.name={name!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    recipe = RECIPE_BY_NAME[name]
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


_FORMAT = 1  # layout of corpus.pt


def prepare_corpus(data_cfg: Mapping[str, Any], data_root: Path, cache_dir: Path) -> PreparedCorpus:
    """The recipe ``data_cfg["name"]``, from ``cache_dir`` when an identical preparation exists.

    The cache folder ``<cache_dir>/<recipe>-<key>/`` holds ``corpus.pt`` (ids, references, info;
    loads with ``weights_only=True``), ``dict.txt``, the BPE codes (``bpe.codes`` or
    ``spm.model``) and ``info.json``.  The key hashes the options, the inputs' sha256 and
    :data:`PREP_VERSION`, so a changed option or file gets its own folder.
    """
    recipe, opts = resolve_options(data_cfg)
    data_root, cache_dir = Path(data_root).expanduser(), Path(cache_dir).expanduser()
    paths = recipe.inputs(opts, data_root)
    if recipe.registered_inputs:  # require_dataset has verified them against the registry
        hashes = {role: MULTI30K_SHA256[p.name] for role, p in paths.items()}
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


def _prepare(recipe: Recipe, opts: dict[str, Any], paths: dict[str, Path],
             hashes: dict[str, str], directory: Path) -> PreparedCorpus:
    text = recipe.read(opts, paths)
    segment = Segmenter(opts, [*text.src["train"], *text.tgt["train"]], directory)
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
