"""Step-time overhead of adanorm.analysis.GradientStatsRecorder on a real training step.

A Transformer encoder (every norm slot AdaNorm) is trained with and without the recorder; rounds
are interleaved and the ratio is the median of per-round ratios against the step without it.

    python benchmarks/bench_analysis_overhead.py --out benchmarks/results/analysis_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

import adanorm
from adanorm.analysis import GradientStatsRecorder


def build(norm: str, layers: int, d_model: int, heads: int) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
    )
    model = nn.TransformerEncoder(
        layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
    )
    adanorm.convert_norms(model, norm)
    return model


def time_steps(
    model, opt, x, steps: int, recorder: GradientStatsRecorder | None, start: int
) -> float:
    begin = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        if recorder is None:
            model(x).square().mean().backward()
        else:
            with recorder.step(start + i):
                model(x).square().mean().backward()
            recorder.pop()
        opt.step()
    return (time.perf_counter() - begin) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="adanorm")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.norm, args.layers, args.d_model, args.heads)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.seq, args.d_model)
    recorders = {every: GradientStatsRecorder(model, every=every) for every in args.every}
    time_steps(model, opt, x, 3, None, 0)  # warm-up
    ratios: dict[int, list[float]] = {every: [] for every in args.every}
    base_times: list[float] = []
    step = 0
    for _ in range(args.rounds):
        base = time_steps(model, opt, x, args.steps, None, 0)
        base_times.append(base)
        for every, recorder in recorders.items():
            # Steps counted from a multiple of `every`, so each round records its share exactly.
            t = time_steps(model, opt, x, args.steps, recorder, step)
            ratios[every].append(t / base)
        step += args.steps

    result = {
        "command": "python benchmarks/bench_analysis_overhead.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None and k != "out"
        ),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "base_step_ms_median": 1e3 * statistics.median(base_times),
        "ratio_median": {str(e): statistics.median(r) for e, r in ratios.items()},
        "ratio_all_rounds": {str(e): r for e, r in ratios.items()},
    }
    print(f"base step: {result['base_step_ms_median']:.1f} ms (median of {args.rounds} rounds)")
    for every, value in result["ratio_median"].items():
        print(f"recorder every={every:>3}: {value:.3f}x step time (median paired ratio)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.out) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
