"""The translation model, beam search, batching and criterion (data preparation: test_mt_data)."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import adanorm
from adanorm.lab.config import ConfigError, load_config
from adanorm.lab.tasks.mt.batching import batches_by_tokens
from adanorm.lab.tasks.mt.bleu import Postprocessor, bleu_from_statistics, bleu_statistics
from adanorm.lab.tasks.mt.model import TransformerMT
from adanorm.lab.tasks.mt.search import (
    SearchConfig,
    beam_search,
    greedy_search,
    sequence_log_prob,
)
from adanorm.lab.tasks.mt.task import MTTask
from adanorm.lab.trainer import Trainer

PAD, BOS, EOS = 0, 1, 2
NORM_TYPES = (nn.LayerNorm, adanorm.LayerNorm, adanorm.LayerNormSimple, adanorm.DetachNorm,
              adanorm.AdaNorm, adanorm.NoNorm)


def tiny_model(norm: str = "layernorm", *, vocab: int = 11, pre_norm: bool = True,
               layers: int = 2, seed: int = 0) -> TransformerMT:
    torch.manual_seed(seed)
    model = TransformerMT(
        vocab, vocab, pad=PAD, make_norm=lambda d: adanorm.make_norm(norm, d), d_model=16,
        d_ffn=32, n_head=2, enc_layers=layers, dec_layers=layers, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pre_norm=pre_norm, max_positions=64,
    )
    return model.eval()


def norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


@pytest.mark.parametrize("norm", ["layernorm", "layernorm-simple", "detachnorm", "adanorm", "none"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_every_norm_is_the_configured_one(norm: str, pre_norm: bool) -> None:
    enc, dec = 3, 2
    torch.manual_seed(0)
    model = TransformerMT(11, 11, pad=PAD, make_norm=lambda d: adanorm.make_norm(norm, d),
                          d_model=16, d_ffn=32, n_head=2, enc_layers=enc, dec_layers=dec,
                          pre_norm=pre_norm)
    norms = norm_modules(model)
    expected_type = type(adanorm.make_norm(norm, 16))
    assert all(type(m) is expected_type for m in norms), {type(m).__name__ for m in norms}
    finals = 2 if pre_norm else 0
    assert len(norms) == 2 * enc + 3 * dec + finals
    if norm == "adanorm":
        assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_paper_size_model_has_32_norms_all_adanorm() -> None:
    model = TransformerMT(100, 100, pad=PAD, make_norm=lambda d: adanorm.AdaNorm(d, scale=2.0),
                          d_model=512, d_ffn=1024, n_head=4, enc_layers=6, dec_layers=6)
    norms = norm_modules(model)
    assert len(norms) == 32 and all(isinstance(m, adanorm.AdaNorm) for m in norms)
    assert model.src_embed is model.tgt_embed  # shared embeddings, joined dictionary


def test_share_embeddings_needs_one_vocabulary() -> None:
    with pytest.raises(ValueError, match="src_vocab=10 and tgt_vocab=12"):
        TransformerMT(10, 12, pad=PAD, make_norm=nn.LayerNorm, d_model=16, n_head=2)


def random_batch(batch: int = 3, vocab: int = 11, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7][:batch]
    src = torch.full((batch, max(lengths)), PAD)
    for row, length in enumerate(lengths):
        src[row, :length] = torch.randint(3, vocab, (length,), generator=generator)
        src[row, length - 1] = EOS
    prev = torch.randint(3, vocab, (batch, 6), generator=generator)
    prev[:, 0] = BOS
    return src, prev


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("norm", ["layernorm", "adanorm"])
def test_incremental_decoding_matches_teacher_forcing(norm: str, pre_norm: bool) -> None:
    model = tiny_model(norm, pre_norm=pre_norm)
    src, prev = random_batch()
    with torch.no_grad():
        full = model(src, prev)
        memory, mask = model.encode(src)
        cache: dict = {}
        steps = [model.decode_step(prev[:, t], memory, mask, cache, t) for t in range(6)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_sentence() -> None:
    model = tiny_model()
    src, prev = random_batch()
    with torch.no_grad():
        batched = model(src, prev)
        for row in range(src.shape[0]):
            length = int(src[row].ne(PAD).sum())
            alone = model(src[row : row + 1, :length], prev[row : row + 1])
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_reorder_cache_follows_beams() -> None:
    model = tiny_model()
    src, prev = random_batch()
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        memory, mask = model.encode(src)
        cache: dict = {}
        model.decode_step(prev[:, 0], memory, mask, cache, 0)
        model.reorder_cache(cache, order)
        got = model.decode_step(prev[order, 1], memory[order], mask[order], cache, 1)
        expected = model(src[order], prev[order, :2])[:, 1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_beam_one_is_greedy() -> None:
    model = tiny_model(seed=3)
    src, _ = random_batch()
    cfg = SearchConfig(beam=1, max_len_a=1.0, max_len_b=4)
    assert beam_search(model, src, bos=BOS, eos=EOS, cfg=cfg) == greedy_search(
        model, src, bos=BOS, eos=EOS, cfg=cfg
    )


def test_batched_beam_search_equals_one_sentence_at_a_time() -> None:
    model = tiny_model(seed=4)
    src, _ = random_batch()
    cfg = SearchConfig(beam=4, lenpen=1.0, max_len_a=1.0, max_len_b=3)
    batched = beam_search(model, src, bos=BOS, eos=EOS, cfg=cfg)
    for row in range(src.shape[0]):
        length = int(src[row].ne(PAD).sum())
        alone = beam_search(model, src[row : row + 1, :length], bos=BOS, eos=EOS, cfg=cfg)
        assert batched[row] == alone[0]


@pytest.mark.parametrize("lenpen", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_exact_optimum(lenpen: float) -> None:
    """Vocabulary of 3 real tokens, 1 or 2 tokens + eos (min_len 1): a beam wider than every
    prefix set finalizes every hypothesis, so it must return the best of all 12 by exhaustive
    scoring."""
    vocab = 6  # pad, bos, eos + tokens 3, 4, 5
    model = tiny_model(vocab=vocab, seed=5)
    src = torch.tensor([[3, 4, 5, EOS]])
    cfg = SearchConfig(beam=40, lenpen=lenpen, max_len_a=0.0, max_len_b=3)
    found = beam_search(model, src, bos=BOS, eos=EOS, cfg=cfg)[0]
    candidates = [list(c) for n in (1, 2) for c in itertools.product([3, 4, 5], repeat=n)]

    def normalized(hyp: list[int]) -> float:
        return sequence_log_prob(model, src, hyp, bos=BOS, eos=EOS) / (len(hyp) + 1) ** lenpen

    best = max(candidates, key=normalized)
    assert math.isclose(normalized(found), normalized(best), rel_tol=1e-5, abs_tol=1e-6)


def test_beam_search_respects_max_length_and_terminates() -> None:
    model = tiny_model(seed=6)
    src, _ = random_batch()
    for max_len_b in (1, 2, 5):
        cfg = SearchConfig(beam=3, max_len_a=0.0, max_len_b=max_len_b)
        for hyp in beam_search(model, src, bos=BOS, eos=EOS, cfg=cfg):
            assert len(hyp) + 1 <= max_len_b  # + the eos
            assert PAD not in hyp and BOS not in hyp and EOS not in hyp


def test_search_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="beam must be >= 1, got 0"):
        SearchConfig(beam=0)


def test_label_smoothing_is_fairseqs() -> None:
    torch.manual_seed(0)
    logits, target, eps = torch.randn(7, 13), torch.randint(1, 13, (7,)), 0.1
    target[2] = PAD
    ours = F.cross_entropy(logits, target, ignore_index=PAD, reduction="sum",
                           label_smoothing=eps)
    lprobs = F.log_softmax(logits, -1)
    keep = target.ne(PAD)
    nll = -lprobs[keep].gather(1, target[keep, None]).sum()
    smooth = -lprobs[keep].sum()
    fairseq = (1 - eps) * nll + eps / lprobs.shape[-1] * smooth
    torch.testing.assert_close(ours, fairseq)


def test_batches_by_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(1, 30, (500,), generator=generator).tolist()
    tgt = torch.randint(1, 30, (500,), generator=generator).tolist()
    batches = batches_by_tokens(src, tgt, 200)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        assert len(batch) * max(max(src[i], tgt[i]) for i in batch) <= 200
    # sorted by length: little padding, far fewer batches than one per sentence
    assert len(batches) < 500 * 16 / 200 * 2
    capped = batches_by_tokens(src, tgt, 10_000, max_sentences=64)
    assert max(len(b) for b in capped) == 64
    with pytest.raises(ValueError, match="sentence 3 has 40 tokens"):
        batches_by_tokens([1, 2, 3, 40], [1, 1, 1, 1], 32)


# --- the task through the engine (real Multi30k, a few hundred sentences) ----------------------
def _multi30k_root() -> str | None:
    root = os.environ.get("ADANORM_DATA")
    if not root:
        return None
    path = Path(root).expanduser().resolve()
    return str(path) if (path / "multi30k" / "raw" / "train.de.gz").exists() else None


needs_multi30k = pytest.mark.skipif(
    _multi30k_root() is None,
    reason="Multi30k not found: set ADANORM_DATA to a directory holding multi30k/raw "
    "(CI sets ADANORM_DATA=../shared/data)",
)


@needs_multi30k
def test_task_model_uses_only_the_configured_norm(tmp_path: Path) -> None:
    cfg = load_config("mt", "smoke", [f"data.cache_dir={tmp_path}", "model.norm=adanorm",
                                      "model.norm_kwargs.scale=2"])
    model = MTTask(cfg, _multi30k_root()).build_model()
    norms = norm_modules(model)
    assert len(norms) == 2 + 2 * 1 + 3 * 1
    assert all(isinstance(m, adanorm.AdaNorm) and m.scale == 2.0 for m in norms)


@needs_multi30k
def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    cfg = load_config("mt", "smoke", [f"data.cache_dir={tmp_path / 'cache'}",
                                      "train.progress=false"])
    run = tmp_path / "run"
    results = Trainer(cfg, run, data_dir=_multi30k_root(), progress=False).fit()
    test = results["test"]
    assert 0.0 <= test["bleu"] <= 100.0 and 0.0 <= test["sacrebleu"] <= 100.0
    assert "tokenized BLEU (de->en" in results["test_metric_label"]
    assert "tok:13a" in results["sacrebleu_signature"]
    assert "case:lc" in results["sacrebleu_signature"]
    assert results["final_model"] == "average of the weights at steps [15, 20]"
    assert len(list(run.glob("checkpoint_avg_*.pt"))) == 2
    throughput = results["train_throughput_per_second"]
    assert throughput["tokens"] > 0 and results["train_totals"]["sentences"] > 0
    lines = (run / "translations.test.txt").read_text().splitlines()
    assert len(lines) == test["sentences"] <= 8 * 16
    tokenized = (run / "translations.test.tok.txt").read_text().splitlines()
    assert len(tokenized) == len(lines) and not any("@@" in line for line in tokenized)
    # The valid loss selects nothing here (averaging), but is logged at every evaluation.
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [5, 10, 15, 20]


@needs_multi30k
def test_bleu_of_the_references_is_100(tmp_path: Path) -> None:
    """The scoring path end to end: feed the test references through it as hypotheses."""
    cfg = load_config("mt", "smoke", [f"data.cache_dir={tmp_path}"])
    task = MTTask(cfg, _multi30k_root())
    test = task.corpus().splits["test"]
    stats = bleu_statistics(test.ref_tok, test.ref_tok, tokenize="none", lowercase=False)
    assert bleu_from_statistics(stats) == pytest.approx(100.0)
    # a BPE'd reference decoded and post-processed gives the tokenized reference back
    post = Postprocessor(task.corpus().tgt_lang, "subword-nmt")
    d = task.corpus().dictionary
    restored = [post.remove_bpe(d.decode(t.tolist())) for t in test.tgt[:200]]
    unk = d.unk
    exact = [r == ref for r, ref, t in zip(restored, test.ref_tok, test.tgt, strict=False)
             if unk not in t.tolist()]
    assert exact and all(exact)


def test_batch_size_keys_are_refused_with_the_token_keys_named() -> None:
    """Translation batches by tokens: data.batch_size (examples per micro-step everywhere else)
    is refused in one line that names its replacement, not silently given another meaning."""
    for key, replacement in (("data.batch_size=2", "data.max_tokens"),
                             ("data.eval_batch_size=2", "data.eval_max_tokens")):
        with pytest.raises(ConfigError, match=rf"{key.split('=')[0]} is not a key of task "
                                               rf"'mt': .*{replacement}") as caught:
            load_config("mt", "smoke", [key])
        assert "\n" not in str(caught.value)
    cfg = load_config("mt", "smoke")
    assert "batch_size" not in cfg["data"] and "eval_batch_size" not in cfg["data"]


@needs_multi30k
def test_collate_and_evaluation_are_told_the_split(tmp_path: Path) -> None:
    """A batch is plain sentence indices (no split marker, no decode flag); the test split, and
    only it, is decoded and scored with BLEU."""
    cfg = load_config("mt", "smoke", [f"data.cache_dir={tmp_path}"])
    task = MTTask(cfg, _multi30k_root())
    torch.manual_seed(0)
    model = task.build_model().eval()
    for split in ("valid", "test"):
        dataset = task.dataset(split)
        size = len(task.corpus().splits[split])
        assert all(0 <= i < size for i in dataset[0])
        batch = task.collate([dataset[0]], split)
        assert set(batch) == {"src", "prev", "target", "index", "target_tokens", "src_tokens"}
        assert batch["index"].tolist() == dataset[0]
        with torch.no_grad():
            stats = task.eval_batch_stats(model, batch, split)
        assert ("tok_sys_len" in stats) == (split == "test")
