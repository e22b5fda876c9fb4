"""Character-level LM task: Transformer-XL pieces, data protocols, memory and the engine end to end.

Real data is used only where ADANORM_DATA is set; everything else runs on tiny synthetic data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import adanorm
from adanorm.lab.config import load_config
from adanorm.lab.data import ChecksumError, DataMissingError, require_dataset
from adanorm.lab.task import get_task, register_task
from adanorm.lab.tasks.lm.data import (
    Corpus,
    EvalStreams,
    SegmentWindows,
    TrainStreams,
    enwik8_corpus,
    read_enwik8_zip,
)
from adanorm.lab.tasks.lm.model import TransformerXL, attention_mask, rel_shift
from adanorm.lab.tasks.lm.task import LMTask
from adanorm.lab.trainer import LAST, Trainer

REAL_DATA = os.environ.get("ADANORM_DATA")
needs_real_data = pytest.mark.skipif(
    not REAL_DATA or not (Path(REAL_DATA).expanduser() / "tiny_shakespeare/input.txt").exists(),
    reason="the real Tiny Shakespeare is not under ADANORM_DATA (tiny_shakespeare/input.txt; "
    "CI sets ADANORM_DATA=../shared/data)",
)


def tiny_model(norm: str = "layernorm", **kwargs) -> TransformerXL:
    torch.manual_seed(0)
    options = dict(vocab_size=11, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                   dropout=0.0, dropatt=0.0, mem_len=8)
    options.update(kwargs)
    return TransformerXL(make_norm=lambda d: adanorm.make_norm(norm, d), **options).eval()


# --- model pieces ---------------------------------------------------------------------------------
def test_rel_shift_puts_distance_columns_under_their_keys() -> None:
    qlen, mlen = 4, 3
    klen = qlen + mlen
    scores = torch.randn(2, qlen, klen)
    shifted = rel_shift(scores)
    for i in range(qlen):
        for j in range(mlen + i + 1):  # keys a query may see; the rest is masked garbage
            column = j + qlen - 1 - i  # column of distance mlen + i - j
            assert shifted[:, i, j].equal(scores[:, i, column])


def test_same_length_mask_gives_every_query_the_same_number_of_keys() -> None:
    mask = attention_mask(5, 7, same_length=True, mem_len=7)
    visible = (~mask).sum(dim=1)
    assert visible.unique().numel() == 1 and int(visible[0]) == 7
    causal = attention_mask(5, 7, same_length=False, mem_len=7)
    assert (~causal).sum(dim=1).tolist() == [8, 9, 10, 11, 12]


def test_memory_reproduces_attention_over_the_whole_sequence() -> None:
    """Two segments with memory give the logits of one pass over both (memory >= segment)."""
    model = tiny_model()
    tokens = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        whole, _ = model(tokens, mem_len=12)
        first, mems = model(tokens[:, :5], mem_len=12)
        second, _ = model(tokens[:, 5:], mems, mem_len=12)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-4)


def test_model_is_causal_and_memory_is_detached() -> None:
    model = tiny_model().train()
    tokens = torch.randint(0, 11, (2, 9))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    with torch.no_grad():
        a, _ = model.eval()(tokens)
        b, _ = model(changed)
    assert a[:, :6].allclose(b[:, :6]) and not a[:, 6:].allclose(b[:, 6:])
    model.train()
    _, mems = model(tokens)
    assert len(mems) == 2 and all(not m.requires_grad and m.shape == (2, 8, 16) for m in mems)


def test_clamp_len_only_matters_beyond_the_clamp() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 11, (2, 10))
    with torch.no_grad():
        base, _ = model(tokens)
        wide, _ = model(tokens, clamp_len=50)
        narrow, _ = model(tokens, clamp_len=2)
    assert base.allclose(wide)
    assert base[:, :3].allclose(narrow[:, :3], atol=1e-6)  # distances <= 2 only
    assert not base[:, 3:].allclose(narrow[:, 3:])


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("norm", adanorm.available_norms())
def test_every_norm_comes_from_make_norm(norm: str, pre_norm: bool) -> None:
    made: list[nn.Module] = []

    def make_norm(d: int) -> nn.Module:
        made.append(adanorm.make_norm(norm, d))
        return made[-1]

    model = TransformerXL(vocab_size=7, n_layer=3, d_model=8, n_head=2, d_head=4, d_inner=16,
                          dropout=0.1, dropatt=0.0, make_norm=make_norm, pre_norm=pre_norm,
                          mem_len=4)
    assert len(made) == 2 * 3 + (1 if pre_norm else 0)
    used = {id(m) for m in model.modules()}
    assert all(id(m) in used for m in made)
    logits, _ = model(torch.randint(0, 7, (2, 5)))
    logits.sum().backward()
    assert model.word_emb.weight.grad is not None and logits.shape == (2, 5, 7)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_full_backward_hooks_on_norms_see_every_gradient(pre_norm: bool) -> None:
    """No norm output is modified in place: full backward hooks (gradient statistics) work."""
    model = tiny_model("layernorm-simple", pre_norm=pre_norm).train()
    norms = [m for m in model.modules() if isinstance(m, type(adanorm.make_norm(
        "layernorm-simple", 16)))]
    seen: list[torch.Tensor] = []
    for norm in norms:
        norm.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0]))
    tokens = torch.randint(0, 11, (2, 6))
    _, mems = model(tokens)
    logits, _ = model(tokens, mems)
    logits.square().mean().backward()
    assert len(norms) == (5 if pre_norm else 4) and len(seen) == len(norms)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in seen)


def test_bad_model_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="d_model"):
        TransformerXL(vocab_size=5, n_layer=1, d_model=7, n_head=1, d_head=4, d_inner=8,
                      dropout=0.0, dropatt=0.0, make_norm=nn.LayerNorm)


# --- data -----------------------------------------------------------------------------------------
def test_segment_windows_tile_the_split() -> None:
    ids = torch.arange(50, dtype=torch.uint8)
    windows = SegmentWindows(ids, tgt_len=8, context=8)
    assert len(windows) == (50 - 1 - 8) // 8
    batch = windows.__getitems__([0, 1, 4])
    assert batch.dtype == torch.long and batch.shape == (3, 17)
    assert batch[0].tolist() == list(range(17))
    assert batch[1, 8:].tolist() == list(range(16, 25))  # next target segment follows on
    with pytest.raises(IndexError):
        windows.__getitems__([len(windows)])


def test_train_streams_keep_each_row_on_its_own_contiguous_stream() -> None:
    ids = torch.arange(50, dtype=torch.uint8)
    streams = TrainStreams(ids, n_streams=3, tgt_len=4)  # streams of 16: [0, 16), [16, 32), ...
    assert streams.segments_per_stream == 3 and len(streams) == 9
    first, second = streams.__getitems__([0, 1, 2]), streams.__getitems__([3, 4, 5])
    assert first.dtype == torch.long and first.shape == (3, 5)
    assert first[:, 0].tolist() == [0, 16, 32] and second[:, 0].tolist() == [4, 20, 36]
    assert second[:, 0].equal(first[:, -1])  # each row continues its own stream
    assert streams.__getitems__([8])[0].tolist() == list(range(40, 45))
    # A DDP process owning streams 1..2 reads the same rows in every batch.
    assert streams.__getitems__([4, 5])[:, 0].tolist() == [20, 36]
    with pytest.raises(IndexError):
        streams.__getitems__([9])
    with pytest.raises(ValueError, match="too short for 3 streams"):
        TrainStreams(torch.arange(14, dtype=torch.uint8), n_streams=3, tgt_len=4)


def test_eval_streams_cut_the_split_into_equal_rows() -> None:
    streams = EvalStreams(torch.arange(23, dtype=torch.uint8), 4)
    assert len(streams) == 4 and streams.__getitems__([1, 3]).tolist() == [
        list(range(5, 10)), list(range(15, 20))]
    with pytest.raises(ValueError, match="too short"):
        EvalStreams(torch.arange(5, dtype=torch.uint8), 4)


def fake_enwik8(sizes: tuple[int, int, int]) -> bytes:
    generator = torch.Generator().manual_seed(0)
    symbols = torch.tensor([10, 32, 60, 62, 97, 98, 99, 195, 169], dtype=torch.uint8)
    picks = torch.randint(0, len(symbols), (sum(sizes),), generator=generator)
    return bytes(symbols[picks].tolist())


def write_zip(path: Path, member: str, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path


def test_enwik8_protocols_on_a_synthetic_zip(tmp_path: Path) -> None:
    sizes = (900, 50, 50)
    data = fake_enwik8(sizes)
    archive = write_zip(tmp_path / "enwik8.zip", "enwik8", data)
    read = read_enwik8_zip(archive, member_sha256=hashlib.sha256(data).hexdigest())
    assert read == data

    raw = enwik8_corpus(read, "raw", sizes)
    assert (raw.vocab_size, raw.unit) == (256, "byte") and "newlines kept" in raw.protocol
    assert bytes(raw.train.tolist()) == data[:900] and bytes(raw.test.tolist()) == data[950:]

    txl = enwik8_corpus(read, "txl", sizes)
    assert txl.vocab_size == 8 and txl.unit == "character" and "newlines dropped" in txl.protocol
    stripped = [bytes(b for b in part if b != 10) for part in (data[:900], data[900:950],
                                                               data[950:])]
    order = sorted(set(b"".join(stripped)))
    for encoded, part in zip((txl.train, txl.valid, txl.test), stripped, strict=True):
        assert [order[i] for i in encoded.tolist()] == list(part)

    with pytest.raises(ValueError, match="protocol 'bytes'"):
        enwik8_corpus(read, "bytes", sizes)
    with pytest.raises(ValueError, match="needs 1001"):
        enwik8_corpus(read, "raw", (901, 50, 50))


def test_enwik8_refuses_wrong_archives(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "enwik8.zip", "enwik8", b"not wikipedia")
    with pytest.raises(ChecksumError, match="not the Hutter Prize"):
        read_enwik8_zip(archive)  # the real member checksum
    with pytest.raises(ValueError, match="no member named 'enwik8'"):
        read_enwik8_zip(write_zip(tmp_path / "other.zip", "readme", b"x"), member_sha256=None)
    # The registry refuses the zip itself before anything reads it.
    root = tmp_path / "root"
    with pytest.raises(DataMissingError, match="enwik8.zip"):
        require_dataset("enwik8", root)
    write_zip(root / "enwik8" / "enwik8.zip", "enwik8", b"not wikipedia")
    with pytest.raises(ChecksumError, match="547994d9"):
        require_dataset("enwik8", root)


def test_enwik8_needs_a_protocol() -> None:
    # Refused when the config is loaded (before any run directory exists), and by the task.
    with pytest.raises(ValueError, match="data.protocol must be one of raw, txl"):
        load_config("lm", "paper", ["data.protocol=chars"])
    cfg = load_config("lm", "paper")
    cfg["data"]["protocol"] = "chars"
    with pytest.raises(ValueError, match="data.protocol must be one of raw, txl"):
        LMTask(cfg)


# --- criterion and evaluation ---------------------------------------------------------------------
SYNTHETIC_TEXT = ("the quick brown fox jumps over the lazy dog. " * 60).encode()


@register_task("lm-synthetic-test")
class SyntheticLM(LMTask):
    """The LM task on a repeated pangram, so the engine test needs no dataset files."""

    datasets = ()

    def corpus(self) -> Corpus:
        if self._corpus is None:
            ids = torch.tensor(list(SYNTHETIC_TEXT), dtype=torch.uint8) - 32
            n = ids.numel()
            self._corpus = Corpus(ids[: int(0.8 * n)], ids[int(0.8 * n) : int(0.9 * n)],
                                  ids[int(0.9 * n) :], 96, "character", "synthetic pangram")
            self.test_metric_label = f"BPC per character [{self._corpus.protocol}]"
        return self._corpus


def synthetic_cfg(*overrides: str) -> dict:
    cfg = load_config("lm", "smoke", ["data.max_examples=0", "data.eval_streams=4",
                                      "data.eval_batch_size=2", *overrides])
    cfg["task"] = "lm-synthetic-test"
    cfg["data"]["name"] = "synthetic"
    return cfg


def test_training_loss_uses_memory_of_the_preceding_segment() -> None:
    """With memory covering the warm-up, the loss equals that of one pass over the window."""
    task = SyntheticLM(synthetic_cfg("data.train_mode=warmup"))
    model = task.build_model().eval()
    batch = task.collate(task.dataset("train").__getitems__([0, 3, 5]), "train")
    assert batch.shape == (3, 2 * task.tgt_len + 1)
    loss, stats = task.loss(model, batch)
    logits, _ = model(batch[:, :-1], mem_len=0)
    expected = nn.functional.cross_entropy(
        logits[:, task.tgt_len :].reshape(-1, 96), batch[:, task.tgt_len + 1 :].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert stats["symbols"] == 3 * task.tgt_len


def test_evaluate_carries_memory_across_segments() -> None:
    """Memory longer than a stream: segment-by-segment evaluation equals one full pass."""
    task = SyntheticLM(synthetic_cfg("model.eval_mem_len=400", "model.eval_clamp_len=-1",
                                     "model.eval_same_length=false", "model.eval_tgt_len=7"))
    model = task.build_model().eval()
    valid = task.dataset("valid")
    streams = task.collate(valid.__getitems__(list(range(len(valid)))), "valid")
    metrics = task.evaluate(model, [streams[:2], streams[2:]], lambda s: s,
                            contextlib.nullcontext, "valid")
    with torch.no_grad():
        logits, _ = model(streams[:, :-1], mem_len=0)
    nats = nn.functional.cross_entropy(logits.reshape(-1, 96), streams[:, 1:].reshape(-1))
    assert metrics["symbols"] == streams[:, 1:].numel()
    assert math.isclose(metrics["loss"], float(nats), rel_tol=1e-4)
    assert math.isclose(metrics["bpc"], metrics["loss"] / math.log(2))


# --- the engine, end to end -----------------------------------------------------------------------
def test_smoke_training_through_the_engine(tmp_path: Path) -> None:
    cfg = synthetic_cfg("train.max_steps=12", "train.eval_every=6", "optim.lr=0.01",
                        "model.norm=adanorm", "model.norm_kwargs.scale=2")
    results = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert results["test_metric_label"] == "BPC per character [synthetic pangram]"
    assert results["steps"] == 12 and results["valid"]["bpc"] < math.log2(96)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["split"] for r in lines].count("valid") == 2
    assert get_task("lm") is LMTask


@needs_real_data
def test_real_tiny_shakespeare_smoke_preset(tmp_path: Path) -> None:
    cfg = load_config("lm", "smoke", ["train.max_steps=2", "train.eval_every=2"])
    task = LMTask(cfg, REAL_DATA)
    corpus = task.corpus()
    assert corpus.vocab_size == 65
    assert [t.numel() for t in (corpus.train, corpus.valid, corpus.test)] == [
        1003854, 55769, 55771]
    results = Trainer(cfg, tmp_path / "run", data_dir=REAL_DATA, progress=False).fit()
    assert "tiny_shakespeare characters" in results["test_metric_label"]
    assert results["valid"]["symbols"] == 64 * (55769 // 64 - 1)


def test_figure1_plot_reads_a_sweep_directory(tmp_path: Path) -> None:
    from adanorm.lab.plots import curves_at_common_steps
    from adanorm.lab.tasks.lm.plots import plot_bpc_figure

    for norm, offset in (("layernorm", 0.0), ("layernorm-simple", 0.1)):
        for seed in (1, 2):
            run = tmp_path / "sweep" / "tiny_shakespeare" / norm / f"seed{seed}"
            run.mkdir(parents=True)
            with open(run / "metrics.jsonl", "w") as fh:
                for step in (10, 20, 30):
                    for split in ("train", "valid"):
                        bpc = 3.0 - step / 20 + offset + seed / 100
                        fh.write(json.dumps({"split": split, "step": step, "bpc": bpc}) + "\n")
    runs = [[{"split": "train", "step": 1, "bpc": 2.0}, {"split": "train", "step": 2, "bpc": 1.0}],
            [{"split": "train", "step": 2, "bpc": 3.0}]]
    assert curves_at_common_steps(runs, "train", "bpc") == ([2], [[1.0], [3.0]])
    out = plot_bpc_figure(tmp_path / "sweep", tmp_path / "fig.png")
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="no runs"):
        plot_bpc_figure(tmp_path / "sweep", tmp_path / "x.png", norms=("adanorm",))


# --- stream mode: memory carried across updates ---------------------------------------------------
def stream_pair_losses(task: LMTask, model: TransformerXL, batches: list[torch.Tensor]) -> list:
    task.begin_train_epoch(0, 0)
    return [float(task.loss(model, batch)[0]) for batch in batches]


def test_train_mode_is_checked_and_memory_segments_belong_to_warmup() -> None:
    assert SyntheticLM(synthetic_cfg()).train_mode == "stream"
    assert not SyntheticLM(synthetic_cfg()).shuffle_train
    assert SyntheticLM(synthetic_cfg("data.train_mode=warmup")).shuffle_train
    with pytest.raises(ValueError, match="data.train_mode must be one of stream, warmup"):
        SyntheticLM(synthetic_cfg("data.train_mode=ordered"))
    with pytest.raises(ValueError, match="segments=2 applies to data.train_mode=warmup"):
        SyntheticLM(synthetic_cfg("model.train_memory_segments=2"))
    warm = SyntheticLM(synthetic_cfg("data.train_mode=warmup", "model.train_memory_segments=2"))
    assert warm.memory_segments == 2
    for preset in ("smoke", "cpu", "paper"):
        assert load_config("lm", preset)["data"]["train_mode"] == "stream"


def test_memory_of_mem_len_0_and_carried_memory_differ_exactly_where_they_should() -> None:
    """First segment: no memory yet, both models agree.  Second segment: the carried memory (one
    whole previous segment) gives exactly the logits of one pass over both segments, mem_len 0
    those of the second segment alone."""
    carried_task = SyntheticLM(synthetic_cfg())
    plain_task = SyntheticLM(synthetic_cfg("model.mem_len=0"))
    carried = carried_task.build_model().eval()
    with torch.no_grad():  # weights far from the near-uniform init, so that context matters
        for weight in carried.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.3)
    plain = plain_task.build_model().eval()
    plain.load_state_dict(carried.state_dict())
    train = carried_task.dataset("train")
    n = train.n_streams
    batches = [train.__getitems__(list(range(b * n, (b + 1) * n))) for b in range(2)]
    with torch.no_grad():
        with_memory = stream_pair_losses(carried_task, carried, batches)
        without = stream_pair_losses(plain_task, plain, batches)
        both = torch.cat([batches[0][:, :-1], batches[1][:, :-1]], dim=1)
        whole, _ = carried(both, mem_len=0)
        alone, _ = carried(batches[1][:, :-1], mem_len=0)
    t = carried_task.tgt_len
    targets = batches[1][:, 1:].reshape(-1)
    expected_carried = nn.functional.cross_entropy(whole[:, t:].reshape(-1, 96), targets)
    expected_plain = nn.functional.cross_entropy(alone.reshape(-1, 96), targets)
    assert with_memory[0] == pytest.approx(without[0], abs=1e-6)
    assert with_memory[1] == pytest.approx(float(expected_carried), rel=1e-5)
    assert without[1] == pytest.approx(float(expected_plain), rel=1e-5)
    assert abs(with_memory[1] - without[1]) > 0.05
    assert plain_task.state_dict()["mems"] == []


def test_the_memory_of_one_stream_never_mixes_with_another() -> None:
    task = SyntheticLM(synthetic_cfg())
    model = task.build_model().eval()
    train = task.dataset("train")
    n = train.n_streams
    batches = [train.__getitems__(list(range(b * n, (b + 1) * n))) for b in range(2)]
    changed = [batches[0].clone(), batches[1]]
    changed[0][3, :-1] = (changed[0][3, :-1] + 5) % 96  # stream 3's first segment, not its target
    with torch.no_grad():
        stream_pair_losses(task, model, batches)
        reference = task.state_dict()["mems"]
        stream_pair_losses(task, model, changed)
        perturbed = task.state_dict()["mems"]
    # The memory after the second segment: layer 0's is that segment's embedding (unchanged in
    # every row); the higher layers' attended to the first segment's memory, so only row 3 moves.
    others = [s for s in range(n) if s != 3]
    assert reference[0].equal(perturbed[0])
    for a, b in zip(reference[1:], perturbed[1:], strict=True):
        assert a[others].equal(b[others]) and not a[3].allclose(b[3])


@register_task("lm-synthetic-recording-test")
class RecordingSyntheticLM(SyntheticLM):
    """Records, for every training forward pass, the tokens, the memory passed in and each
    layer's input states (what the memory of the next segment must be made of)."""

    calls: list[dict] = []

    def build_model(self) -> nn.Module:
        model = super().build_model()
        calls = RecordingSyntheticLM.calls

        def before_model(module, args):
            if module.training:
                mems = args[1] if len(args) > 1 else None
                calls.append({"tokens": args[0].clone(), "mems": [m.clone() for m in mems or []],
                              "layer_inputs": []})

        def before_layer(module, args):
            if module.training:
                calls[-1]["layer_inputs"].append(args[0].detach().clone())

        model.register_forward_pre_hook(before_model)
        for layer in model.layers:
            layer.register_forward_pre_hook(before_layer)
        return model


def test_memory_passed_to_update_t_plus_1_is_update_t_hidden_states(tmp_path: Path) -> None:
    RecordingSyntheticLM.calls.clear()
    cfg = synthetic_cfg("train.max_steps=12", "train.eval_every=100", "optim.lr=0.01")
    cfg["task"] = "lm-synthetic-recording-test"
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    calls = RecordingSyntheticLM.calls
    task = SyntheticLM(synthetic_cfg())
    train_ids, n, t, mem_len = task.corpus().train.long(), 8, task.tgt_len, task.mem_len
    stream_len = train_ids.numel() // n
    per_epoch = (stream_len - 1) // t
    assert len(calls) == 12 and per_epoch == 8
    for step, call in enumerate(calls):
        segment = step % per_epoch
        for s in range(n):  # row s is always stream s, read in order
            start = s * stream_len + segment * t
            assert call["tokens"][s].equal(train_ids[start : start + t])
        if segment == 0:
            assert call["mems"] == []  # every epoch starts with empty memory
            continue
        previous = calls[step - 1]["layer_inputs"]
        assert len(call["mems"]) == len(previous) == 2
        for mem, hidden in zip(call["mems"], previous, strict=True):
            assert mem.equal(hidden[:, -mem_len:])


def test_stream_mode_resumes_exactly_after_a_crash(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory is in the checkpoint: a run cut inside an epoch replays the same bytes."""
    overrides = ("train.max_steps=14", "train.checkpoint_every=3", "train.log_every=2",
                 "train.eval_every=5", "optim.lr=0.01")
    Trainer(synthetic_cfg(*overrides), tmp_path / "full", progress=False).fit()

    class Killed(Exception):
        pass

    original = Trainer._optimizer_step

    def crashing(self, batches):
        original(self, batches)
        if self.state.step == 13:
            raise Killed

    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(Killed):
        Trainer(synthetic_cfg(*overrides), tmp_path / "cut", progress=False).fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    saved = torch.load(tmp_path / "cut" / LAST, weights_only=True)
    assert saved["trainer"]["step"] == 12 and saved["task"]["micro_batch"] == 4  # mid-epoch
    assert len(saved["task"]["mems"]) == 2 and saved["task"]["mems"][0].shape == (8, 32, 32)
    Trainer(synthetic_cfg(*overrides), tmp_path / "cut", resume=True, progress=False).fit()
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (
        tmp_path / "full/metrics.jsonl").read_bytes()


def test_resuming_a_stream_run_without_its_memory_is_refused(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    overrides = ("train.max_steps=14", "train.checkpoint_every=3", "train.eval_every=100")
    original = Trainer._optimizer_step

    def crashing(self, batches):
        original(self, batches)
        if self.state.step == 13:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(synthetic_cfg(*overrides), tmp_path / "run", progress=False).fit()
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    last = tmp_path / "run" / LAST
    saved = torch.load(last, weights_only=True)
    # The resume check refuses the changed mode before the task sees the checkpoint.
    with pytest.raises(ValueError, match="data.train_mode 'stream' -> 'warmup'"):
        Trainer(synthetic_cfg(*overrides, "data.train_mode=warmup"), tmp_path / "run",
                resume=True, progress=False).fit()
    saved.pop("task")  # a checkpoint written before the memory was saved
    torch.save(saved, last)
    with pytest.raises(RuntimeError, match="checkpoint's memory is for None"):
        Trainer(synthetic_cfg(*overrides), tmp_path / "run", resume=True, progress=False).fit()


def _cli_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                           env.get("PYTHONPATH", "")])}


CLI = [sys.executable, "-m", "adanorm.lab.cli", "train", "lm", "--preset", "smoke",
       "--no-progress"]


@needs_real_data
def test_stream_mode_sigkilled_and_resumed_writes_the_same_bytes(tmp_path: Path) -> None:
    """A real kill -9 of ``adanorm train lm`` inside an epoch, then ``--resume``."""
    settings = ["--data-dir", REAL_DATA, "--set", "train.max_steps=40", "train.eval_every=20",
                "train.checkpoint_every=3", "train.log_every=2"]
    env = _cli_env()
    subprocess.run([*CLI, "--run-dir", str(tmp_path / "full"), *settings], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen([*CLI, "--run-dir", str(tmp_path / "cut"), *settings], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / LAST
    deadline = time.time() + 240
    while time.time() < deadline:
        with contextlib.suppress(Exception):  # the file may be mid-rename
            if last.exists() and torch.load(last, weights_only=True)["trainer"]["step"] >= 12:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/results.json").exists(), "the run finished before it was killed"
    subprocess.run([*CLI, "--run-dir", str(tmp_path / "cut"), "--resume", *settings],
                   check=True, env=env, capture_output=True, timeout=300)
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (
        tmp_path / "full/metrics.jsonl").read_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_real_data
@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_stream_mode_two_gloo_processes_match_one_and_resume_exactly(tmp_path: Path) -> None:
    """8 global streams: 1 process reads all 8, 2 processes 4 each with their own memory; a
    2-process run stopped inside an epoch (step 6 of 8) and resumed matches the uninterrupted one
    (the constant schedule lets the stopped run end at step 6 and resume to 12)."""
    settings = ["--data-dir", REAL_DATA, "--set", "train.eval_every=6", "train.log_every=2",
                "model.norm=adanorm", "schedule.name=constant"]
    env = _cli_env()
    subprocess.run([*CLI, "--run-dir", str(tmp_path / "one"), *settings, "train.max_steps=12"],
                   check=True, env=env, capture_output=True, timeout=300)

    def two_processes(run: str, max_steps: int, *flags: str) -> None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                    "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                    str(_free_port())]
        done = subprocess.run([*launcher, *CLI[1:], "--run-dir", str(tmp_path / run), *flags,
                               *settings, f"train.max_steps={max_steps}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    two_processes("two", 12)
    two_processes("cut", 6)
    (tmp_path / "cut" / "results.json").unlink()
    two_processes("cut", 12, "--resume")
    assert (tmp_path / "cut/metrics.jsonl").read_bytes() == (
        tmp_path / "two/metrics.jsonl").read_bytes()
    kept = sorted(p.name for p in (tmp_path / "two").glob("*_rank1*"))
    # The older steps' files are removed; the RNG file is named by step too.
    assert kept == ["rng_rank1_step000000012.pt", "task_state_rank1_step000000012.pt"]
    rank1 = torch.load(tmp_path / "two" / "task_state_rank1_step000000012.pt", weights_only=True)
    assert rank1["micro_batch"] == 4 and rank1["mems"][0].shape[0] == 4  # its own 4 streams
    assert torch.load(tmp_path / "two" / LAST, weights_only=True)["task"]["mems"][0].shape[0] == 4
    one = [json.loads(line) for line in (tmp_path / "one/metrics.jsonl").open()]
    two = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").open()]
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["bpc"] == pytest.approx(b["bpc"], rel=1e-4, abs=1e-4), (a, b)
    wa = torch.load(tmp_path / "one" / LAST, weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / LAST, weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
