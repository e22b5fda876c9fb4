"""What users can fix gets one line and exit status 2; lost or corrupted files are refused or
rebuilt, never used."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from lab_helpers import read_jsonl, train

from adanorm.lab import cli
from adanorm.lab.config import load_config
from adanorm.lab.tasks.vision.digits import DigitsTask
from adanorm.lab.trainer import LAST, METRICS, RESULTS

SMOKE = ["--preset", "smoke", "--no-progress"]


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"adanorm {command}: error: "), err
    assert "Traceback" not in err
    return err


# --- adanorm download without a network -----------------------------------------------------------
def test_download_without_network_is_one_line_and_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "new-root"
    assert cli.main(["download", "mnist", "--data-dir", str(root)]) == 2
    err = _one_line_error(capsys, "download")
    assert "train-images-idx3-ubyte.gz" in err and "network" in err
    assert not root.exists()  # neither the data root nor mnist/ is left behind, empty
    tmp_path.joinpath("existing").mkdir()
    assert cli.main(["download", "mnist", "--data-dir", str(tmp_path / "existing")]) == 2
    assert list((tmp_path / "existing").iterdir()) == []


def test_download_of_an_unknown_dataset_lists_every_known_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["download", "nosuch"]) == 2
    err = _one_line_error(capsys, "download")
    assert "'nosuch'" in err and "mnist" in err and "tiny_shakespeare" in err


# --- checkpoints ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(run)
    return run


def _unfinished_copy(finished_run: Path, where: Path) -> Path:
    """The finished run without results.json: ``--resume`` loads its last checkpoint."""
    run = where / "run"
    shutil.copytree(finished_run, run)
    (run / RESULTS).unlink()
    return run


def _resume(run: Path) -> int:
    return cli.main(["train", "digits", *SMOKE, "--run-dir", str(run), "--resume"])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "no rng"])
def test_a_damaged_checkpoint_is_one_line_naming_it(
    damage: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _unfinished_copy(finished_run, tmp_path)
    last = run / LAST
    data = last.read_bytes()
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        last.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        state = torch.load(last, weights_only=True)
        del state["rng"]
        torch.save(state, last)
    assert _resume(run) == 2
    err = _one_line_error(capsys, "train")
    assert str(last) in err and "delete the run directory" in err
    assert "weights_only" not in err  # torch's advice to unpickle untrusted files


def test_a_damaged_best_checkpoint_is_one_line(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _unfinished_copy(finished_run, tmp_path)
    (run / "checkpoint_best.pt").write_bytes(b"\x80\x02not a checkpoint")
    assert _resume(run) == 2
    assert "checkpoint_best.pt" in _one_line_error(capsys, "train")


# --- metrics.jsonl shorter than the checkpoint recorded -------------------------------------------
@pytest.mark.parametrize("damage", ["shorter", "replaced"])
def test_resume_refuses_a_metrics_file_that_lost_lines(
    damage: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _unfinished_copy(finished_run, tmp_path)
    metrics = run / METRICS
    recorded = torch.load(run / LAST, weights_only=True)["metrics_bytes"]
    if damage == "shorter":
        lines = metrics.read_bytes()[:recorded].splitlines(keepends=True)
        metrics.write_bytes(b"".join(lines[:-2]))
    else:  # as long as before, but the recorded length no longer ends a line
        metrics.write_bytes(b'{"split": "train"}\n' + b"x" * recorded)
    before = metrics.read_bytes()
    assert _resume(run) == 2
    err = _one_line_error(capsys, "train")
    assert str(metrics) in err and f"recorded {recorded} bytes" in err
    assert metrics.read_bytes() == before  # not extended with NUL bytes, not truncated
    assert not (run / RESULTS).exists()


def test_resume_without_a_checkpoint_drops_the_lines_of_the_failed_attempt(
    tmp_path: Path,
) -> None:
    train(tmp_path / "clean")
    run = tmp_path / "run"
    run.mkdir()
    # An attempt that logged (every 4 updates) but died before its first checkpoint (8).
    (run / METRICS).write_text('{"split": "train", "step": 4, "loss": 9.0}\n')
    train(run, resume=True)
    assert read_jsonl(run / METRICS) == read_jsonl(tmp_path / "clean" / METRICS)


# --- out of memory --------------------------------------------------------------------------------
def test_out_of_memory_in_training_names_the_value_to_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def cpu_oom(self, model, batch):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 4503599627370496 bytes."
        )

    monkeypatch.setattr(DigitsTask, "loss", cpu_oom)
    code = cli.main(["train", "digits", *SMOKE, "--run-dir", str(tmp_path / "r")])
    assert code == 2
    err = _one_line_error(capsys, "train")
    assert "out of memory" in err and "during training at step 0" in err
    assert "lower data.batch_size (now 32)" in err and "optim.accum_steps (now 1)" in err


def test_out_of_memory_in_evaluation_names_the_evaluation_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def cuda_oom(self, model, batch, split):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DigitsTask, "eval_batch_stats", cuda_oom)
    code = cli.main(["train", "digits", *SMOKE, "--run-dir", str(tmp_path / "r")])
    assert code == 2
    err = _one_line_error(capsys, "train")
    assert "during valid evaluation at step 8" in err
    assert "lower data.eval_batch_size (now 100)" in err


def test_an_unexpected_error_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(self, model, batch):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(DigitsTask, "loss", bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["train", "digits", *SMOKE, "--run-dir", str(tmp_path / "r")])


# --- the parsing feature cache --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "old layout"])
def test_a_corrupted_parsing_cache_is_rebuilt(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from test_parsing import _write_synthetic_ptb

    from adanorm.lab.tasks.parsing import task as parsing_module

    _write_synthetic_ptb(tmp_path / "ptb")
    cfg = load_config("parsing", "smoke", [
        "data.name=ptb", f"data.ptb_dir={tmp_path / 'ptb'}", f"data.cache_dir={tmp_path / 'c'}"])
    monkeypatch.setattr(parsing_module, "_TREEBANKS", {})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    vocab, splits, info = parsing_module.ParsingTask(cfg).treebank()
    assert synced  # written durably
    (cache_file,) = (tmp_path / "c").glob("ptb-*.npz")
    data = cache_file.read_bytes()
    if damage == "truncated":
        cache_file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        cache_file.write_bytes(data[:100] + bytes(len(data) - 200) + data[-100:])
    elif damage == "empty":
        cache_file.write_bytes(b"")
    else:  # a well-formed .npz without the format marker
        with np.load(cache_file) as z:
            arrays = {k: z[k] for k in z.files if k != "format"}
        with open(cache_file, "wb") as fh:
            np.savez(fh, **arrays)
    monkeypatch.setattr(parsing_module, "_TREEBANKS", {})
    capsys.readouterr()
    vocab2, splits2, info2 = parsing_module.ParsingTask(cfg).treebank()
    assert "rebuilding the unreadable feature cache" in capsys.readouterr().err
    assert vocab2.words == vocab.words and info2 == info
    for a, b in zip(splits["train"], splits2["train"], strict=True):
        np.testing.assert_array_equal(a.features, b.features)
    from adanorm.lab.tasks.parsing.data import load_treebank

    assert load_treebank(cache_file)[2] == info  # the rebuilt file is whole again


def test_a_report_error_at_the_end_of_a_sweep_is_one_line(monkeypatch, capsys):
    """``adanorm sweep`` ends with a report; a run file the report refuses is the user's to fix."""
    from adanorm.lab import cli
    from adanorm.lab.report import ReportError

    def sweep_then_refused_report(args):
        raise ReportError("runs/x/metrics.jsonl: line 3 is not JSON; delete the run or fix it")

    monkeypatch.setattr(cli, "_cmd_sweep", sweep_then_refused_report)
    assert cli.main(["sweep", "mnist", "--norms", "layernorm", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adanorm sweep: error: runs/x/metrics.jsonl: line 3 is not JSON; delete the "
                   "run or fix it"]
