"""The MT corpus recipes: raw parallel text of one release to tokenized lines per split.

Each recipe follows the preprocessing script the literature used, step by step (see
``docs/tasks/mt.md``); where one differs, its docstring says how:

* ``multi30k`` (the real data of the CPU presets): WMT16 multimodal task 1, the official
  preprocessing (lowercase, ``normalize-punctuation.perl``, ``tokenizer.perl``) with sacremoses.
* ``iwslt14_de_en``: fairseq's ``examples/translation/prepare-iwslt14.sh``, from the user's copy
  of the IWSLT 2014 ``de-en.tgz`` release (``data.raw_dir``).
* ``iwslt15_en_vi``: the Stanford NMT files (Luong & Manning 2015), already tokenized.
* ``wmt14_en_de``: fairseq's ``examples/translation/prepare-wmt14en2de.sh``, from the user's files.

**Moses escaping.**  ``tokenizer.perl`` writes ``'`` as ``&apos;``, ``"`` as ``&quot;`` and so on
unless told ``-no-escape``; the fairseq recipes keep the entities (and so does the shipped
IWSLT14 test file), so ``iwslt14_de_en`` and ``wmt14_en_de`` escape by default.  ``multi30k``
does not (``data.moses_escape: false``): an entity is one token either way, so tokenized BLEU is
unchanged, and the vocabulary and detokenized output stay plain text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data import DataFile, DatasetInfo, register_dataset, require_dataset
from .bleu import Postprocessor
from .moses import Moses, clean_corpus, read_lines, squeeze

__all__ = ["RECIPES", "SPLITS", "MULTI30K", "MULTI30K_SHA256", "Recipe", "RecipeText",
           "RECIPE_BY_NAME"]

RECIPES = ("multi30k", "iwslt14_de_en", "iwslt15_en_vi", "wmt14_en_de")
SPLITS = ("train", "valid", "test")

_MULTI30K_RAW = (
    "https://raw.githubusercontent.com/multi30k/dataset/"
    "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
)
MULTI30K_SHA256 = {
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
            for name, digest in MULTI30K_SHA256.items()
        ),
    )
)


@dataclass
class RecipeText:
    """A recipe's output before BPE: tokenized lines per split and the raw target references."""

    src: dict[str, list[str]]
    tgt: dict[str, list[str]]
    ref_detok: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    post_bpe_clean: tuple[float, int, int, tuple[str, ...]] | None = None  # ratio, min, max, splits


@dataclass(frozen=True)
class Recipe:
    name: str
    langs: tuple[str, str]
    default_src: str
    lowercase: bool
    bpe_merges: int
    escape: bool
    aggressive: bool
    protocol: str
    inputs: Callable[[dict[str, Any], Path], dict[str, Path]]
    read: Callable[[dict[str, Any], dict[str, Path]], RecipeText]
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


def _multi30k_read(opts: dict[str, Any], paths: dict[str, Path]) -> RecipeText:
    """The official ``tok/*.lc.norm.tok.*`` pipeline: ``lowercase.perl`` (when lower-casing),
    ``normalize-punctuation.perl -l L``, ``tokenizer.perl -l L`` (with sacremoses; on val and
    test2016 it reproduces the official files in 4027 of 4028 lines, modulo the escaping).
    No cleaning: Multi30k has no empty or overlong lines."""
    src_lang, tgt_lang = opts["src_lang"], opts["tgt_lang"]
    movers = {lang: Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                           normalize=True) for lang in (src_lang, tgt_lang)}
    text = RecipeText({}, {}, {}, {})
    for split in SPLITS:
        raw_src = read_lines(paths[f"{split}.{src_lang}"])
        raw_tgt = read_lines(paths[f"{split}.{tgt_lang}"])
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
            for line in read_lines(path) if "<seg id" in line]


def _iwslt14_read(opts: dict[str, Any], paths: dict[str, Path]) -> RecipeText:
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
    movers = {lang: Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                           normalize=False) for lang in (src_lang, tgt_lang)}
    low = opts["lowercase"]

    def train_side(lang: str) -> tuple[list[str], int]:
        kept, dropped = [], 0
        for line in _head(read_lines(paths[f"train.{lang}"]), opts["max_train_sentences"]):
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
    text = RecipeText({}, {}, {}, {})
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
    "https://nlp.stanford.edu/projects/nmt/ (IWSLT'15 English-Vietnamese); tst2012/tst2013 may "
    "also sit in <data root>/iwslt15_en_vi_eval."
)
_IWSLT15_FILES = {"train": "train", "valid": "tst2012", "test": "tst2013"}


def _iwslt15_inputs(opts: dict[str, Any], data_root: Path) -> dict[str, Path]:
    raw = _raw_dir(opts, data_root, "iwslt15_en_vi", _IWSLT15_WHERE)
    return {f"{split}.{lang}": _need(raw / f"{stem}.{lang}", "iwslt15_en_vi", _IWSLT15_WHERE)
            for split, stem in _IWSLT15_FILES.items() for lang in ("en", "vi")}


def _iwslt15_read(opts: dict[str, Any], paths: dict[str, Path]) -> RecipeText:
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
    text = RecipeText({}, {}, {}, {})
    for split in SPLITS:
        src = [squeeze(s) for s in read_lines(paths[f"{split}.{src_lang}"])]
        tgt = [squeeze(t) for t in read_lines(paths[f"{split}.{tgt_lang}"])]
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


def _wmt14_read(opts: dict[str, Any], paths: dict[str, Path]) -> RecipeText:
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
    text = RecipeText({}, {}, {}, {}, post_bpe_clean=(1.5, 1, 250, ("train", "valid")))
    sides: dict[str, list[str]] = {}
    for lang in (src_lang, tgt_lang):
        mover = Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
                       normalize=True, remove_non_printing=True)
        lines: list[str] = []
        for corpus in _wmt14_corpora(opts):
            if limit is not None and len(lines) >= limit:
                break
            corpus_lines = read_lines(paths[f"{corpus}.{lang}"])
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
        mover = Moses(lang, escape=opts["moses_escape"], aggressive=opts["moses_aggressive"],
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


RECIPE_BY_NAME: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("multi30k", MULTI30K_LANGS, "de", lowercase=True, bpe_merges=8000, escape=False,
                aggressive=False, inputs=_multi30k_inputs, read=_multi30k_read,
                registered_inputs=True,
                protocol="Multi30k task 1 (val / test2016 flickr), official preprocessing with "
                "sacremoses (lowercase, punctuation normalization, tokenizer without entities)"),
        Recipe("iwslt14_de_en", ("de", "en"), "de", lowercase=True, bpe_merges=10000,
                escape=True, aggressive=False, inputs=_iwslt14_inputs, read=_iwslt14_read,
                protocol="IWSLT14 fairseq prepare-iwslt14.sh (Moses tokenizer, clean 1.5/175, "
                "lowercase, valid = every 23rd train line, test = dev2010+dev2012+tst2010-2012)"),
        Recipe("iwslt15_en_vi", ("en", "vi"), "en", lowercase=False, bpe_merges=10000,
                escape=True, aggressive=False, inputs=_iwslt15_inputs, read=_iwslt15_read,
                protocol="IWSLT15 Stanford NMT files (pre-tokenized, cased; valid tst2012, test "
                "tst2013)"),
        Recipe("wmt14_en_de", ("en", "de"), "en", lowercase=False, bpe_merges=40000,
                escape=True, aggressive=True, inputs=_wmt14_inputs, read=_wmt14_read,
                protocol="WMT14 fairseq prepare-wmt14en2de.sh (valid = every 100th train line, "
                "test newstest2014, BPE 40k, clean 1.5/250 after BPE)"),
    )
}
