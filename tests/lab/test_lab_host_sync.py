"""No host synchronization per micro-step: loss statistics stay on the device until a log line.

On CPU nothing waits, so the tests make every tensor-to-host conversion (``float(t)``,
``t.item()``, ``bool(t)``, ...) raise while the trainer runs a micro-step; a conversion there
would make a GPU wait for its queue every step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from lab_helpers import read_jsonl, smoke_cfg

from adanorm.lab.config import load_config
from adanorm.lab.task import add_stats, stats_to_floats
from adanorm.lab.trainer import LAST, Trainer

_HOST_CONVERSIONS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")

# The smoke preset of every task family, and the file its real data must provide.
_TASK_DATA = {
    "digits": None,
    "mnist": "mnist/train-images-idx3-ubyte.gz",
    "textcls": "rt_polarity/rt-polarity.pos",
    "parsing": "ud_english_ewt",
    "lm": "tiny_shakespeare",
    "mt": "multi30k/raw/train.de.gz",
}


def _data_root() -> Path | None:
    root = os.environ.get("ADANORM_DATA")
    return Path(root).expanduser().resolve() if root else None


def _forbid_host_sync_in_micro_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make host conversions raise inside ``Trainer._micro_step``; return its call counter."""
    inside = [False]
    calls = [0]
    for name in _HOST_CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, __original=original, __name=name, **kwargs):
            if inside[0]:
                raise AssertionError(f"host synchronization in a micro-step: Tensor.{__name}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    micro_step = Trainer._micro_step

    def watched(self, *args, **kwargs):
        inside[0] = True
        calls[0] += 1
        try:
            return micro_step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(Trainer, "_micro_step", watched)
    return calls


@pytest.mark.parametrize("task", sorted(_TASK_DATA))
def test_micro_steps_never_wait_for_the_device(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needed, root = _TASK_DATA[task], _data_root()
    if needed is not None and (root is None or not (root / needed).exists()):
        pytest.skip(f"{needed} not found under ADANORM_DATA (CI sets ADANORM_DATA=../shared/data)")
    overrides = ["train.progress=false", "train.max_steps=3", "train.max_epochs=0",
                 "train.eval_every=3", "train.log_every=1", "data.max_examples=256"]
    if task in ("mt", "parsing"):
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
    if task == "parsing":  # keep the process-level treebank cache as other tests expect it
        from adanorm.lab.tasks.parsing import task as parsing_module

        monkeypatch.setattr(parsing_module, "_TREEBANKS", {})
    cfg = load_config(task, "smoke", overrides)
    calls = _forbid_host_sync_in_micro_steps(monkeypatch)
    Trainer(cfg, tmp_path / "run", data_dir=str(root) if root else None, argv=["test"]).fit()
    assert calls[0] >= 3
    train_lines = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train_lines)


def test_device_sums_equal_python_float_sums_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(50, generator=generator) * 3  # float32, like a loss
    on_device: dict = {}
    on_host: dict = {}
    for value in losses:
        add_stats(on_device, {"loss_sum": value * 7, "n": 7.0})
        on_host["loss_sum"] = on_host.get("loss_sum", 0.0) + float(value * 7)
        on_host["n"] = on_host.get("n", 0.0) + 7.0
    assert isinstance(on_device["loss_sum"], torch.Tensor)
    assert on_device["loss_sum"].dtype == torch.float64
    assert stats_to_floats(on_device) == on_host


def test_a_non_finite_loss_is_reported_with_its_step_and_nothing_is_saved_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adanorm.lab.tasks.vision.digits import DigitsTask

    original = DigitsTask.loss
    seen = [0]

    def loss_nan_at_update_5(self, model, batch):
        loss, stats = original(self, model, batch)
        seen[0] += 1
        if seen[0] == 6:  # the 6th micro-batch: update index 5 (0-based)
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(DigitsTask, "loss", loss_nan_at_update_5)
    cfg = smoke_cfg("train.log_every=8", "train.checkpoint_every=8", "train.eval_every=8")
    trainer = Trainer(cfg, tmp_path / "run", argv=["test"])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at step 5 "):
        trainer.fit()
    assert not (tmp_path / "run/metrics.jsonl").exists()  # the first log line was at update 8
    assert not (tmp_path / "run" / LAST).exists()
