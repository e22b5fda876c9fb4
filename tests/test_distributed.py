"""DistributedDataParallel with every variant: two gloo processes on CPU equal one process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adanorm

NORMS = ["layernorm", "layernorm-simple", "detachnorm", "detach-std", "adanorm"]


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), adanorm.make_norm(norm, 24), nn.ReLU(), nn.Linear(24, 3)
    )


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train_steps(model: nn.Module, x, y, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        for norm in NORMS:
            ddp = nn.parallel.DistributedDataParallel(_model(norm))
            _train_steps(ddp, x[shard], y[shard])
            if rank == 0:
                torch.save(ddp.module.state_dict(), os.path.join(out_dir, f"{norm}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    for norm in NORMS:
        single = _model(norm)
        _train_steps(single, x, y)
        ddp_state = torch.load(tmp_path / f"{norm}.pt", weights_only=True)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6, msg=norm)
