"""The parsing task: readers, arc-standard oracle, features, batched greedy decoding, UAS/LAS and
an end-to-end smoke training through the real engine (synthetic CoNLL-X treebank; real UD
English-EWT only where ADANORM_DATA is set)."""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from lab_helpers import read_jsonl

from adanorm.lab.config import load_config
from adanorm.lab.tasks.parsing import conll
from adanorm.lab.tasks.parsing import data as pd
from adanorm.lab.tasks.parsing import transitions as arc_standard
from adanorm.lab.tasks.parsing.data import EWT_FILES
from adanorm.lab.tasks.parsing.model import MLPParser
from adanorm.lab.tasks.parsing.task import (
    ParsingTask,
    attachment_counts,
    greedy_parse,
)
from adanorm.lab.tasks.parsing.transitions import NULL, ROOT
from adanorm.lab.trainer import Trainer

CONLLU = """# sent_id = s1
# text = Don't stop.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tstop\tstop\tVERB\tVB\t_\t0\troot\t_\t_
3.1\tit\tit\tPRON\tPRP\t_\t_\t_\t3:obj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = s2
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
2\t!\t!\tPUNCT\t.\t_\t1\tpunct\t_\t_

"""


def _random_projective_heads(n: int, rng: random.Random) -> list[int]:
    """A random projective single-rooted tree over words 1..n (heads, 0 = ROOT)."""
    heads = [0] * (n + 1)

    def subtree(lo: int, hi: int) -> int:  # the words lo..hi form one subtree; return its root
        root = rng.randint(lo, hi)
        for side_lo, side_hi in ((lo, root - 1), (root + 1, hi)):
            start = side_lo
            while start <= side_hi:  # cut the side into consecutive dependent subtrees
                end = rng.randint(start, side_hi)
                heads[subtree(start, end)] = root
                start = end + 1
        return root

    heads[subtree(1, n)] = 0
    return heads[1:]


NON_PROJECTIVE = [3, 4, 0, 3]  # arcs 1<-3 and 2<-4 cross


# --- readers ------------------------------------------------------------------------------------
def test_conllu_reader_skips_multiword_tokens_and_empty_nodes(tmp_path: Path) -> None:
    path = tmp_path / "x.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    first, second = conll.read_conllu(path, "xpos")
    assert first.forms == ["Do", "n't", "stop", "."]
    assert first.heads == [3, 3, 0, 3]
    assert first.tags == ["VBP", "RB", "VB", "."]
    assert first.deprels == ["aux", "advmod", "root", "punct"]
    assert first.punct == [False, False, False, True]
    assert second.forms == ["Hi", "!"] and second.punct == [False, True]
    assert conll.read_conllu(path, "upos")[0].tags == ["AUX", "PART", "VERB", "PUNCT"]
    with pytest.raises(ValueError, match="pos_field"):
        conll.read_conllu(path, "lemma")


def test_conllx_reader_and_configurable_punctuation_tags(tmp_path: Path) -> None:
    rows = [
        "1\tHe\the\tPRP\tPRP\t_\t2\tnsubj\t_\t_",
        "2\tsaid\tsay\tVBD\tVBD\t_\t0\troot\t_\t_",
        "3\t,\t,\t,\t,\t_\t2\tpunct\t_\t_",
        "4\t``\t``\t``\t``\t_\t2\tpunct\t_\t_",
        "5\tno\tno\tUH\tUH\t_\t2\tdep\t_\t_",
        "6\t-LRB-\t-LRB-\t-LRB-\t-LRB-\t_\t2\tpunct\t_\t_",
    ]
    path = tmp_path / "x.conllx"
    path.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    (sent,) = conll.read_conllx(path)
    assert sent.heads == [2, 0, 2, 2, 2, 2]
    # The default PTB set is `` '' , . : : -LRB- is not punctuation under it.
    assert sent.punct == [False, False, True, True, False, False]
    (custom,) = conll.read_conllx(path, punct_tags=[",", "-LRB-"])
    assert custom.punct == [False, False, True, False, False, True]
    bad = tmp_path / "bad.conllx"
    bad.write_text("1\tHe\the\tPRP\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected 10 tab-separated"):
        conll.read_conllx(bad)
    bad.write_text("1\tHe\t_\tPRP\tPRP\t_\t7\tnsubj\t_\t_\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="head 7"):
        conll.read_conllx(bad)


# --- transition system and oracle ---------------------------------------------------------------
def test_projectivity_check() -> None:
    assert conll.is_projective([2, 0, 2])
    assert not conll.is_projective(NON_PROJECTIVE)
    # Crossing the arc from ROOT: word 2 is the root, word 1 attaches to word 3 over it.
    assert not conll.is_projective([3, 0, 2])


def test_oracle_derives_every_projective_tree_and_refuses_non_projective() -> None:
    rng = random.Random(0)
    num_labels = 3
    for _ in range(300):
        n = rng.randint(1, 25)
        heads = _random_projective_heads(n, rng)
        assert conll.is_projective(heads) and conll.root_count(heads) == 1
        labels = [rng.randrange(num_labels) for _ in range(n)]
        transitions, _ = arc_standard.oracle_transitions(heads, labels, num_labels)
        assert len(transitions) == 2 * n
        state = arc_standard.ParseState(n)
        for t in transitions:
            shift, left, right = arc_standard.legal_moves(state)
            assert (shift, left, right)[0 if t == 0 else 1 if t <= num_labels else 2]
            arc_standard.apply_transition(state, t, num_labels)
        assert state.terminal and state.heads[1:] == heads
        assert [lab - 1 for lab in state.labels[1:]] == labels
    with pytest.raises(arc_standard.OracleError):
        arc_standard.oracle_transitions(NON_PROJECTIVE, [0, 0, 0, 0], 1)
    with pytest.raises(arc_standard.OracleError):
        arc_standard.oracle_transitions([0, 0], [0, 0], 1)  # two roots


def test_chen_manning_features_positions() -> None:
    # "a b c": gold heads 2 <- 1 and 2 <- 3, ROOT <- 2.  Word id = 10 + position, tag id = 20 +.
    words, tags = [ROOT, 11, 12, 13], [ROOT, 21, 22, 23]
    state = arc_standard.ParseState(3)
    feats = arc_standard.extract_features(state, words, tags)
    assert len(feats) == arc_standard.NUM_FEATURES == 48
    assert feats[:6] == [ROOT, NULL, NULL, 11, 12, 13]  # s1 = ROOT, b1..b3
    L = 2  # two labels: LEFT(l) = 1 + l, RIGHT(l) = 3 + l
    for t in (0, 0, 1 + 1):  # SHIFT a, SHIFT b, LEFT-ARC label 1: b heads a
        arc_standard.apply_transition(state, t, L)
    arc_standard.apply_transition(state, 0, L)  # SHIFT c
    feats = arc_standard.extract_features(state, words, tags)
    words_f, tags_f, labels_f = feats[:18], feats[18:36], feats[36:]
    assert words_f[:6] == [13, 12, ROOT, NULL, NULL, NULL]  # s1=c, s2=b, s3=ROOT
    assert words_f[6:12] == [NULL] * 6  # c has no children
    # Children of s2 = b: lc1 = a, rc1 none, lc2 none, rc2 none, lc1(lc1) none, rc1(rc1) none.
    assert words_f[12:18] == [11, NULL, NULL, NULL, NULL, NULL]
    assert tags_f[12] == 21
    assert labels_f[6] == 1 + 1 and labels_f[:6] == [NULL] * 6


# --- decoding and scoring -----------------------------------------------------------------------
def _encoded(n_sentences: int, seed: int, vocab_size: int = 30) -> list[pd.EncodedSentence]:
    rng = random.Random(seed)
    out = []
    for i in range(n_sentences):
        n = 1 + (i % 17)
        heads = NON_PROJECTIVE if i == 3 else _random_projective_heads(n, rng)
        sent = conll.Sentence(
            forms=[f"w{rng.randrange(vocab_size)}" for _ in heads],
            tags=[f"T{rng.randrange(5)}" for _ in heads],
            heads=heads,
            deprels=[rng.choice(["a", "b", "c"]) for _ in heads],
            punct=[rng.random() < 0.2 for _ in heads],
        )
        out.append(sent)
    vocab = pd.build_vocab(out, 1, True)
    return [pd.encode_sentence(s, vocab) for s in out], vocab  # type: ignore[return-value]


def _tiny_parser(vocab: pd.Vocab, norm: str = "layernorm") -> MLPParser:
    torch.manual_seed(0)
    import adanorm

    return MLPParser(
        vocab.num_words,
        vocab.num_tags,
        1 + vocab.num_labels,
        vocab.num_transitions,
        lambda size: adanorm.make_norm(norm, size),
        word_dim=4,
        tag_dim=4,
        label_dim=4,
        hidden_sizes=[16, 16],
    ).eval()


def test_greedy_parse_gives_a_projective_tree_for_every_sentence_and_batching_is_exact() -> None:
    sentences, vocab = _encoded(40, seed=1)
    assert len(sentences[3].transitions) == 0  # the non-projective one: no oracle, still parsed
    model = _tiny_parser(vocab)
    with torch.no_grad():
        batched = greedy_parse(model, sentences, vocab.num_labels)
        one_by_one = [greedy_parse(model, [s], vocab.num_labels)[0] for s in sentences]
    for sent, (heads, labels), (heads1, labels1) in zip(
        sentences, batched, one_by_one, strict=True
    ):
        assert len(heads) == len(sent)
        assert conll.root_count(heads.tolist()) == 1 and conll.is_projective(heads.tolist())
        assert labels.min() >= 1  # the UNK label is never predicted
        np.testing.assert_array_equal(heads, heads1)
        np.testing.assert_array_equal(labels, labels1)


def test_attachment_counts_with_and_without_punctuation() -> None:
    sentences, vocab = _encoded(1, seed=2)
    gold = sentences[0]
    gold.heads = np.array([2, 0, 2, 2])
    gold.labels = np.array([1, 2, 3, 1])
    gold.punct = np.array([False, False, False, True])
    predicted = (np.array([2, 0, 1, 2]), np.array([1, 3, 3, 2]))
    counts = attachment_counts([gold], [predicted])
    assert counts["words"] == 4 and counts["words_excl_punct"] == 3
    assert counts["uas_incl"] == 3 and counts["las_incl"] == 1  # word 1 only
    assert counts["uas_excl"] == 2 and counts["las_excl"] == 1


# --- the task through the engine ----------------------------------------------------------------
def _write_synthetic_ptb(directory: Path, seed: int = 0) -> dict[str, int]:
    """Random projective trees whose heads follow the tags (so there is something to learn), a
    final "." tagged "." (punctuation), and one non-projective sentence per split."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 160, "valid": 30, "test": 30}
    files = {"train": "train.conllx", "valid": "dev.conllx", "test": "test.conllx"}
    for split, name in files.items():
        blocks = []
        for i in range(sizes[split]):
            heads = NON_PROJECTIVE if i == 5 else _random_projective_heads(rng.randint(2, 9), rng)
            root = heads.index(0) + 1
            heads = [*heads, root]
            rows = []
            for j, h in enumerate(heads, start=1):
                punct = j == len(heads)
                tag = "." if punct else ("V" if h == 0 else "N" if h < j else "D")
                form = "." if punct else f"{tag.lower()}{rng.randrange(8)}"
                label = "punct" if punct else {"V": "root", "N": "obj", "D": "det"}[tag]
                rows.append(f"{j}\t{form}\t{form}\t{tag}\t{tag}\t_\t{h}\t{label}\t_\t_")
            blocks.append("\n".join(rows))
        (directory / name).write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return sizes


def test_smoke_training_on_a_synthetic_ptb_through_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adanorm.lab.tasks.parsing import task as parsing_module

    # An empty process-level cache, so that the one treebank in it below is this test's (other
    # tests, the reports' chance check among them, load EWT into it).
    monkeypatch.setattr(parsing_module, "_TREEBANKS", {})
    sizes = _write_synthetic_ptb(tmp_path / "ptb")
    overrides = [
        "data.name=ptb",
        f"data.ptb_dir={tmp_path / 'ptb'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.progress=false",
        "model.norm=adanorm",
    ]
    cfg = load_config("parsing", "smoke", overrides)
    results = Trainer(cfg, tmp_path / "run", argv=["test"]).fit()
    assert "1 dropped from training" in capsys.readouterr().err
    assert results["test_metric"] == "uas_excl_punct"
    assert "punctuation excluded" in results["test_metric_label"]
    assert "gold postag tag in {`` '' , . :}" in results["test_metric_label"]
    for split in ("valid", "test"):
        metrics = results[split]
        assert metrics["sentences"] == sizes[split]  # every sentence, the non-projective one too
        assert metrics["words_excl_punct"] == metrics["words"] - sizes[split]
        assert 0.0 <= metrics["uas_excl_punct"] <= 100.0
        assert metrics["las_incl_punct"] <= metrics["uas_incl_punct"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {r["split"] for r in records} == {"train", "valid", "test"}
    assert all(np.isfinite(r["loss"]) for r in records)
    # The cache file is reused (and equal) by a fresh task in a fresh process-level cache.
    (cache_file,) = (tmp_path / "cache").glob("ptb-*.npz")
    first = parsing_module._TREEBANKS.copy()
    parsing_module._TREEBANKS.clear()
    try:
        vocab, splits, info = ParsingTask(cfg).treebank()
        (vocab0, splits0, info0) = next(iter(first.values()))
        assert vocab.words == vocab0.words and info == info0
        assert info["train_not_oracle_derivable"] == 1
        for a, b in zip(splits["train"], splits0["train"], strict=True):
            np.testing.assert_array_equal(a.features, b.features)
    finally:
        parsing_module._TREEBANKS.update(first)
    assert cache_file.exists()
    # The figure-2 plot (AdaNorm vs LayerNorm losses) reads the finished run.
    from adanorm.lab.tasks.parsing.plots import plot_figure2

    png = plot_figure2(tmp_path, tmp_path / "figure2.png", dataset="ptb")
    assert png.stat().st_size > 1000


def test_training_beats_the_untrained_parser_by_far(tmp_path: Path) -> None:
    """Tags in the synthetic treebank say on which side each head lies: a short training must
    parse far better than the same network untrained (features, oracle and decoding agree)."""
    _write_synthetic_ptb(tmp_path / "ptb", seed=1)
    cfg = load_config(
        "parsing",
        "smoke",
        [
            "data.name=ptb",
            f"data.ptb_dir={tmp_path / 'ptb'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_examples=0",
            "train.max_steps=150",
            "train.eval_every=50",
            "train.progress=false",
        ],
    )
    task = ParsingTask(cfg)
    torch.manual_seed(0)
    untrained = task.evaluate(
        task.build_model().eval(), [task.dataset("test").sentences], lambda s: s, nullcontext,
        "test",
    )
    results = Trainer(cfg, tmp_path / "run", argv=["test"]).fit()
    trained = results["test"]
    assert trained["uas_incl_punct"] > untrained["uas_incl_punct"] + 20.0, (trained, untrained)
    assert trained["loss"] < 0.5 * untrained["loss"]


def test_missing_ptb_files_name_the_expected_paths(tmp_path: Path) -> None:
    cfg = load_config("parsing", "smoke", ["data.name=ptb", f"data.ptb_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="train.conllx"):
        ParsingTask(cfg).dataset("train")
    # Refused when the config is loaded (before any run directory exists), and by the task.
    with pytest.raises(ValueError, match="data.pos_field='upos'"):
        load_config("parsing", "smoke", ["data.name=ptb", "data.pos_field=upos"])
    cfg["data"]["pos_field"] = "upos"
    with pytest.raises(ValueError, match="data.pos_field='upos'"):
        ParsingTask(cfg)


# --- real data ----------------------------------------------------------------------------------
def _ewt_root() -> Path | None:
    root = os.environ.get("ADANORM_DATA")
    if not root:
        return None
    path = Path(root).expanduser().resolve()
    return path if (path / "ud_english_ewt" / EWT_FILES["valid"][0]).exists() else None


needs_ewt = pytest.mark.skipif(
    _ewt_root() is None,
    reason="real UD English-EWT not found: set ADANORM_DATA to a directory holding "
    "ud_english_ewt/*.conllu (CI sets ADANORM_DATA=../shared/data)",
)


@needs_ewt
def test_real_ewt_dev_and_test_word_counts_and_oracle() -> None:
    root = _ewt_root()
    assert root is not None
    for split, sentences, words in (("valid", 2001, 25147), ("test", 2077, 25094)):
        parsed = conll.read_conllu(root / "ud_english_ewt" / EWT_FILES[split][0])
        assert len(parsed) == sentences  # SOURCE.md's split sizes
        assert sum(len(s) for s in parsed) == words  # multiword tokens and empty nodes skipped
        assert all(conll.root_count(s.heads) == 1 for s in parsed)
        derivable = [s for s in parsed if conll.is_projective(s.heads)]
        assert len(parsed) - len(derivable) < 0.03 * len(parsed)
        vocab = pd.build_vocab(parsed, 1, True)
        for s in derivable[:200]:
            labels = [vocab.label_index(d) for d in s.deprels]
            # raises if not derivable
            arc_standard.oracle_transitions(s.heads, labels, vocab.num_labels)


@needs_ewt
def test_real_ewt_registered_checksums_match_source_md() -> None:
    from adanorm.lab.data import require_dataset

    directory = require_dataset("ewt", str(_ewt_root()))
    assert json.dumps(sorted(p.name for p in directory.glob("*.conllu"))) == json.dumps(
        sorted(name for name, _ in EWT_FILES.values())
    )
