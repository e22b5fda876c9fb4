"""End-to-end CPU training step: a 6-layer Transformer encoder (d = 512, 8 heads, sequence 128,
batch 16; forward + backward + AdamW step) with every norm slot (2 per layer + the final norm)
filled by nn.LayerNorm, by adanorm's AdaNorm (fused kernels), by AdaNorm on the pure-PyTorch
fallback, and by a naive eager AdaNorm.  Median paired step-time ratio over interleaved rounds.

    python benchmarks/bench_e2e.py --json benchmarks/results/cpu_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_MAX_") is None:
    # Same allocator settings as bench_norms.py (see its docstring).
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"})

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adanorm import AdaNorm, _kernels  # noqa: E402


class NaiveAdaNorm(nn.Module):
    """AdaNorm as plain eager ops, the way a user would first write it."""

    def __init__(self, width: int, scale: float = 1.0, k: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.scale, self.k, self.eps = scale, k, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return (self.scale * (1 - self.k * y)).detach() * y


class FallbackAdaNorm(AdaNorm):
    """adanorm's AdaNorm forced onto the pure-PyTorch path (what users get without a compiler)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.environ["ADANORM_DISABLE_EXTENSION"] = "1"
        try:
            return super().forward(x)
        finally:
            del os.environ["ADANORM_DISABLE_EXTENSION"]


NORMS = {
    "nn.LayerNorm": nn.LayerNorm,
    "AdaNorm (adanorm)": AdaNorm,
    "AdaNorm (adanorm fallback)": FallbackAdaNorm,
    "AdaNorm (naive eager)": NaiveAdaNorm,
}


def build(norm_cls, d_model: int, heads: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model),
                                  enable_nested_tensor=False)
    for block in model.layers:
        block.norm1 = norm_cls(d_model)
        block.norm2 = norm_cls(d_model)
    model.norm = norm_cls(d_model)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extension = _kernels.cpu_kernels_ready()

    runs = {}
    for name, norm_cls in NORMS.items():
        model = build(norm_cls, args.d_model, args.heads, args.layers, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, args.seq, args.d_model, generator=generator)
        target = torch.randn_like(x)
        runs[name] = (model, optimizer, x, target)

    def step(name: str) -> None:
        model, optimizer, x, target = runs[name]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()

    for name in runs:  # warm-up: allocations, optimizer state, extension load
        step(name)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            begin = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            seconds[name].append((time.perf_counter() - begin) / args.steps)
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)

    base = seconds["nn.LayerNorm"]
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "config": vars(args) | {"json": str(args.json)},
        "extension_loaded": extension,
        "torch": torch.__version__,
        "step_seconds": seconds,
        "median_step_ms": {n: 1e3 * statistics.median(s) for n, s in seconds.items()},
        "median_ratio_vs_layernorm": {
            n: statistics.median(a / b for a, b in zip(s, base, strict=True))
            for n, s in seconds.items()
        },
    }
    print(f"\nTransformer encoder training step, {args.layers} layers, d={args.d_model}, "
          f"{args.heads} heads, seq {args.seq}, batch {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    for name in runs:
        print(f"  {name:<28} {result['median_step_ms'][name]:9.1f} ms/step   "
              f"{result['median_ratio_vs_layernorm'][name]:.3f}x nn.LayerNorm")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
