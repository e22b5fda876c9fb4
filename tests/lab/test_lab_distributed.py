"""DDP: ``torchrun`` with 2 gloo processes on CPU equals 1 process at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lab_helpers import read_jsonl

from adanorm.lab.trainer import LAST

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    overrides = [
        "--set",
        "data.batch_size=32",
        "optim.accum_steps=2",
        "model.norm=adanorm",
        "train.max_steps=12",
        "train.eval_every=6",
    ]
    train = ["-m", "adanorm.lab.cli", "train", "digits", "--preset", "smoke", "--no-progress"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    subprocess.run(
        [sys.executable, *train, "--run-dir", str(tmp_path / "one"), *overrides],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
    ]
    done = subprocess.run(
        [*launcher, *train, "--run-dir", str(tmp_path / "two"), *overrides],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((tmp_path / "two/results.json").read_text())["world_size"] == 2
    one, two = (
        read_jsonl(tmp_path / "one/metrics.jsonl"),
        read_jsonl(tmp_path / "two/metrics.jsonl"),
    )
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a, b)
    wa = torch.load(tmp_path / "one" / LAST, weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / LAST, weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
