"""The generic trainer: determinism, exact resume, accumulation, AMP, early stopping,
checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lab_helpers import needs_mnist, read_jsonl, smoke_cfg, train

from adanorm.lab.samplers import GlobalBatchSampler
from adanorm.lab.trainer import BEST, LAST, RunDirError, Trainer


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path: Path) -> None:
    a = train(tmp_path / "a")
    b = train(tmp_path / "b")
    c = train(tmp_path / "c", "seed=2")
    assert read_jsonl(tmp_path / "a/metrics.jsonl") == read_jsonl(tmp_path / "b/metrics.jsonl")
    assert a["test"] == b["test"]
    assert read_jsonl(tmp_path / "a/metrics.jsonl") != read_jsonl(tmp_path / "c/metrics.jsonl")
    assert c["test"] != a["test"]


def test_run_directory_records_config_commit_seed_versions_device(tmp_path: Path) -> None:
    import json

    import yaml

    train(tmp_path / "r", "seed=7")
    cfg = yaml.safe_load((tmp_path / "r/config.yaml").read_text())
    assert cfg["seed"] == 7 and cfg["task"] == "digits"
    info = json.loads((tmp_path / "r/run.json").read_text())
    assert info["seed"] == 7
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["environment"]["versions"]["torch"] == torch.__version__
    assert info["environment"]["device"] == "cpu"


def test_checkpoints_are_plain_data_loadable_with_weights_only(tmp_path: Path) -> None:
    train(tmp_path / "r")
    for name in (LAST, BEST):
        state = torch.load(tmp_path / "r" / name, weights_only=True)
        assert isinstance(state["model"], dict)
        assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert not list((tmp_path / "r").glob("*.tmp"))


class _Killed(Exception):
    pass


def test_resume_after_a_crash_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Checkpoint every 8 updates, log every 2: the crash at update 11 leaves log lines (10) that
    # were written after the last checkpoint (8); the resumed run must replay them identically.
    overrides = (
        "train.checkpoint_every=8",
        "train.log_every=2",
        "train.eval_every=6",
        "model.dropout=0.3",
    )
    full = train(tmp_path / "full", *overrides)

    original = Trainer._optimizer_step

    def crashing(self, batches):
        original(self, batches)
        if self.state.step == 11:
            raise _Killed

    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(_Killed):
        train(tmp_path / "cut", *overrides)
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    lines = read_jsonl(tmp_path / "cut/metrics.jsonl")
    assert max(r["step"] for r in lines) == 10  # written after the step-8 checkpoint
    with pytest.raises(RunDirError, match="--resume"):
        train(tmp_path / "cut", *overrides)
    resumed = train(tmp_path / "cut", *overrides, resume=True)
    assert read_jsonl(tmp_path / "cut/metrics.jsonl") == read_jsonl(tmp_path / "full/metrics.jsonl")
    assert resumed["test"] == full["test"] and resumed["best_step"] == full["best_step"]


def test_sigkilled_process_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    """A real kill -9 of ``adanorm train`` mid-run, then ``--resume``."""
    settings = [
        "train.max_steps=200",
        "train.eval_every=50",
        "train.checkpoint_every=5",
        "train.log_every=5",
    ]
    train(tmp_path / "full", *settings)  # the uninterrupted reference, in this process
    args = ["--set", *settings]
    base = [
        sys.executable,
        "-m",
        "adanorm.lab.cli",
        "train",
        "digits",
        "--preset",
        "smoke",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*base, "--run-dir", str(tmp_path / "cut"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    last = tmp_path / "cut" / LAST
    while time.time() < deadline:
        if last.exists() and torch.load(last, weights_only=True)["trainer"]["step"] >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/results.json").exists(), "the run finished before it was killed"
    subprocess.run(
        [*base, "--run-dir", str(tmp_path / "cut"), "--resume", *args],
        check=True,
        env=env,
        capture_output=True,
    )
    assert read_jsonl(tmp_path / "cut/metrics.jsonl") == read_jsonl(tmp_path / "full/metrics.jsonl")


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    big = train(tmp_path / "big", "data.batch_size=64", "optim.accum_steps=1")
    acc = train(tmp_path / "acc", "data.batch_size=32", "optim.accum_steps=2")
    assert acc["steps"] == big["steps"]
    a = torch.load(tmp_path / "big" / LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "acc" / LAST, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_gradient_clipping_changes_the_updates(tmp_path: Path) -> None:
    plain = train(tmp_path / "plain")
    clipped = train(tmp_path / "clip", "optim.clip_norm=0.01")
    assert plain["valid"] != clipped["valid"]


def test_bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    result = train(tmp_path / "bf16", "train.amp=bf16")
    assert torch.isfinite(torch.tensor(result["test"]["loss"]))
    assert result["test"]["acc"] > 20  # 10 classes: well above chance after 24 updates


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    from adanorm.lab.config import ConfigError

    with pytest.raises(ConfigError, match="fp16"):
        train(tmp_path / "fp16", "train.amp=fp16")


def test_early_stopping_and_best_checkpoint(tmp_path: Path) -> None:
    # lr = 0: the valid metric never improves after the first evaluation.
    result = train(tmp_path / "r", "optim.lr=0", "train.patience=2")
    assert result["stopped_early"] and result["steps"] == 24
    assert result["best_step"] == 8
    moving = train(tmp_path / "m")
    valid = [r for r in read_jsonl(tmp_path / "m/metrics.jsonl") if r["split"] == "valid"]
    best = max(valid, key=lambda r: r["acc"])  # first maximum wins ties
    assert moving["best_step"] == best["step"]
    assert moving["valid"]["acc"] == pytest.approx(best["acc"])


def test_eval_per_epoch(tmp_path: Path) -> None:
    # 1,197 training digits / 32 = 37 updates per epoch.
    train(tmp_path / "r", "train.eval_every=epoch", "train.max_steps=0", "train.max_epochs=2")
    steps = [r["step"] for r in read_jsonl(tmp_path / "r/metrics.jsonl") if r["split"] == "valid"]
    assert steps == [37, 74]


def test_global_batch_sampler_shards_each_global_batch() -> None:
    one = list(GlobalBatchSampler(100, 8, seed=3, epoch=1))
    two = [list(GlobalBatchSampler(100, 8, seed=3, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(one) == 12
    for b, batch in enumerate(one):
        assert two[0][b] + two[1][b] == batch
    assert list(GlobalBatchSampler(100, 8, seed=3, epoch=1, start_batch=5)) == one[5:]
    assert one != list(GlobalBatchSampler(100, 8, seed=3, epoch=2))
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(100, 9, seed=0, epoch=0, world_size=2)


def test_models_take_their_norms_from_make_norm() -> None:
    import adanorm
    from adanorm.lab.task import get_task

    for norm in adanorm.available_norms():
        cfg = smoke_cfg(f"model.norm={norm}", task="mnist")
        model = get_task("mnist")(cfg).build_model()
        expected = type(adanorm.make_norm(norm, (4, 28, 28)))
        norms = [m for m in model.modules() if isinstance(m, expected)]
        assert len(norms) == 3, norm
    cfg = smoke_cfg("model.norm=adanorm", "model.norm_kwargs.scale=2.5", task="mnist")
    model = get_task("mnist")(cfg).build_model()
    ada = [m for m in model.modules() if isinstance(m, adanorm.AdaNorm)]
    # Per example over (C, H, W) of each conv output: 28 -> 14 -> 7 after each pooling.
    assert [m.normalized_shape for m in ada] == [(4, 28, 28), (8, 14, 14), (8, 7, 7)]
    assert all(m.scale == 2.5 for m in ada)


@needs_mnist
def test_mnist_smoke_run_learns(tmp_path: Path) -> None:
    result = train(tmp_path / "mnist", task="mnist")
    assert result["dataset"] == "mnist" and result["steps"] == 40
    assert result["test"]["acc"] > 50  # tiny CNN, 40 updates on 2,048 examples; chance is 10 %


def test_a_second_trainer_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running trainer holds it
        with pytest.raises(RunDirError, match="another process is training"):
            train(run_dir)
    train(run_dir)  # the lock is gone with its holder


def test_checkpoint_averaging_uses_the_mean_of_the_last_evaluations(tmp_path: Path) -> None:
    cfg = smoke_cfg("train.average_checkpoints=2")
    trainer = Trainer(cfg, tmp_path / "run", argv=["test"])
    results = trainer.fit()
    snapshots = sorted((tmp_path / "run").glob("checkpoint_avg_*.pt"))
    assert [p.name for p in snapshots] == ["checkpoint_avg_000000016.pt",
                                           "checkpoint_avg_000000024.pt"]
    assert results["final_model"] == "average of the weights at steps [16, 24]"
    states = [torch.load(p, weights_only=True)["model"] for p in snapshots]
    for key, value in trainer.module.state_dict().items():
        if torch.is_floating_point(value):
            torch.testing.assert_close(value, (states[0][key] + states[1][key]) / 2)
    # the averaged model is what was evaluated
    assert results["valid"] == trainer.evaluate("valid")


def test_results_report_training_totals_and_throughput(tmp_path: Path) -> None:
    results = train(tmp_path / "run")
    assert results["final_model"] == "best validation checkpoint"
    totals, rate = results["train_totals"], results["train_throughput_per_second"]
    assert totals["n"] == 24 * smoke_cfg()["data"]["batch_size"]
    # train_seconds is rounded to 0.01 s in results.json
    assert abs(rate["n"] * results["train_seconds"] - totals["n"]) <= rate["n"] * 0.005 + 1e-6
