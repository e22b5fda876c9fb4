"""What drawing a dropout mask costs on this CPU, against multiplying the same tensor by a scalar.

The divergence runs on an AMD EPYC spent a fifth of a py-spy profile drawing dropout masks
(``results/divergence/README.md``).  torch's ``bernoulli_(p)`` takes MKL's parallel generator
only on Intel CPUs; elsewhere it draws serially from the mt19937 generator.  This benchmark
measures, for one tensor the size of an MT feed-forward activation (8,192 tokens x 2,048, bf16):

* ``x * 1.1`` (the reference of every ratio: one pass over memory),
* ``F.dropout(x, 0.1)`` as the models call it, and its mask alone (``bernoulli_`` into bf16),
* the same mask into float32 and bool, and ``torch.rand(...) < p`` (other ways to draw it),
* ``torch.randint`` into uint8 (one generator call an element, no conversion to a probability).

Interleaved over rounds in one process (the order rotates each round); each ratio is the median
of the per-round ratios against the multiply.

    PYTHONPATH=src python benchmarks/bench_dropout_mask.py --threads 1 \\
        --out benchmarks/results/cpu_dropout_mask.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REFERENCE = "x * 1.1 (reference)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def candidates(x: torch.Tensor, p: float) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways to draw a mask (and the reference multiply), by row label."""
    return {
        REFERENCE: lambda: x * 1.1,
        "F.dropout (bf16, training)": lambda: F.dropout(x, p, training=True),
        "bernoulli_ into bf16": lambda: torch.empty_like(x).bernoulli_(1 - p),
        "bernoulli_ into float32": lambda: torch.empty(x.shape).bernoulli_(1 - p),
        "bernoulli_ into bool": lambda: torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p),
        "torch.rand (float32) < 1 - p": lambda: torch.rand(x.shape) < 1 - p,
        "torch.randint into uint8": lambda: torch.randint(0, 256, x.shape, dtype=torch.uint8),
    }


def measure(rows: int, cols: int, p: float, rounds: int) -> dict[str, dict[str, float]]:
    """Per row: median milliseconds a call and median ratio to the reference, over rounds."""
    x = torch.randn(rows, cols).to(torch.bfloat16)
    calls = candidates(x, p)
    for call in calls.values():  # warm-up: allocator, first-call dispatch
        call()
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {
            "ms": 1e3 * statistics.median(seconds[name]),
            "ns_per_element": 1e9 * statistics.median(seconds[name]) / x.numel(),
            "ratio_to_reference": statistics.median(
                s / r for s, r in zip(seconds[name], seconds[REFERENCE], strict=True)
            ),
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="conditions worth keeping (e.g. a run beside)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON (atomically)")
    args = parser.parse_args()
    if not 0 < args.p < 1:
        parser.error(f"--p {args.p}: expected a dropout probability in (0, 1)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = measure(args.rows, args.cols, args.p, args.rounds)
    width = max(map(len, results))
    for name, row in results.items():
        print(f"{name:<{width}}  {row['ms']:8.1f} ms  {row['ns_per_element']:6.2f} ns/elem  "
              f"x{row['ratio_to_reference']:.1f}")
    if args.out:
        record = {
            "command": "PYTHONPATH=src python benchmarks/bench_dropout_mask.py "
            f"--rows {args.rows} --cols {args.cols} --p {args.p} --threads {args.threads} "
            f"--rounds {args.rounds} --out {args.out}" + (f" --note {shlex.quote(args.note)}"
                                                         if args.note else ""),
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "threads": args.threads,
            "shape": [args.rows, args.cols],
            "dtype": "bfloat16",
            "p": args.p,
            "rounds": args.rounds,
            "note": args.note,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False,
                                         suffix=".tmp") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        os.replace(handle.name, args.out)


if __name__ == "__main__":
    main()
