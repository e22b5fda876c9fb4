"""Host cost per call of the norm modules against the bare ``adanorm::norm`` op and native LN.

On a tiny tensor (default 64 x 256, float32, CPU) the kernels take a few microseconds, so the
timings show the Python and dispatcher work around them: the same work that decides whether a
CUDA call keeps up with native ``F.layer_norm`` when the GPU is fast (issue #14).  Rows:

* ``F.layer_norm`` without affine (native; the reference of every ratio),
* ``torch.ops.adanorm.norm`` called bare (the C++ op and its C++ autograd, no Python),
* ``AdaNorm`` / ``DetachNorm`` modules (their direct route to the op after the first call),
* ``AdaNorm`` with the direct route switched off (each call through the functional form, as
  before the route existed),
* ``adanorm.functional.ada_norm`` (the functional form, which validates every call).

Forward with grad enabled, forward under ``torch.no_grad``, and forward+backward
(``torch.autograd.grad``), interleaved over rounds in one process (the order rotates each round);
each ratio is the median of the per-round ratios against native.

    PYTHONPATH=src python benchmarks/bench_module_overhead.py \\
        --out benchmarks/results/cpu_module_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import adanorm
import adanorm.functional as AF
from adanorm import _kernels

NATIVE = "F.layer_norm (native, no affine)"


def per_call_us(stmt, calls: int) -> float:
    for _ in range(max(calls // 10, 5)):
        stmt()
    start = time.perf_counter()
    for _ in range(calls):
        stmt()
    return (time.perf_counter() - start) / calls * 1e6


def measure(rows: int, width: int, rounds: int, calls: int) -> dict:
    if not _kernels.cpu_kernels_ready():
        raise SystemExit("bench_module_overhead: the C++ CPU kernels are unavailable")
    torch.manual_seed(0)
    x = torch.randn(rows, width, requires_grad=True)
    xd = x.detach()
    g = torch.randn(rows, width)
    ada, detach = adanorm.AdaNorm(width), adanorm.DetachNorm(width)
    unrouted = _FunctionalAdaNorm(width)
    op = torch.ops.adanorm.norm.default
    fns = {
        NATIVE: lambda t: F.layer_norm(t, (width,)),
        "adanorm::norm op (bare)": lambda t: op(t, 1e-5, False, False, False, 1.0, 0.1),
        "AdaNorm module": ada,
        "DetachNorm module": detach,
        "AdaNorm module (functional route)": unrouted,
        "ada_norm functional": lambda t: AF.ada_norm(t, width),
    }
    modes = {
        "fwd": lambda fn: lambda: fn(x),
        "fwd (no grad)": lambda fn: lambda: _no_grad(fn, xd),
        "fwd+bwd": lambda fn: lambda: torch.autograd.grad(fn(x), x, g),
    }
    samples: dict[tuple[str, str], list[float]] = {(n, m): [] for n in fns for m in modes}
    names = list(fns)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for mode, make in modes.items():
            for name in names[shift:] + names[:shift]:
                samples[(name, mode)].append(per_call_us(make(fns[name]), calls))
    cells = []
    for (name, mode), values in samples.items():
        base = samples[(NATIVE, mode)]
        cells.append({
            "variant": name, "mode": mode, "median_us": statistics.median(values),
            "median_ratio_vs_native": statistics.median(
                v / b for v, b in zip(values, base, strict=True)),
            "us": values,
        })
    return {"shape": [rows, width], "dtype": "float32", "rounds": rounds,
            "calls_per_sample": calls, "cells": cells}


class _FunctionalAdaNorm(adanorm.AdaNorm):
    """AdaNorm whose forward always takes the functional form (the modules before the direct
    route), for comparison."""

    def _fused_forward(self, input):
        return None


def _no_grad(fn, t):
    with torch.no_grad():
        return fn(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.rows, args.width, args.rounds, args.calls)
    result.update(torch=torch.__version__, machine=platform.machine(),
                  processor=platform.processor() or None, threads=torch.get_num_threads())
    print(f"per call, {args.rows} x {args.width} float32 on CPU, median of {args.rounds} "
          f"interleaved rounds x {args.calls} calls:")
    for cell in result["cells"]:
        print(f"  {cell['mode']:<14} {cell['variant']:<36} {cell['median_us']:7.2f} us  "
              f"{cell['median_ratio_vs_native']:.2f}x native")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(result, handle, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
