"""One-shot GPU check of the Triton kernels: correctness against float64, then paired timings.

Run through benchmarks/gpu_check.sh (which bounds it to 5 minutes).  Checks, on the current CUDA
device:

1. AdaNorm, DetachNorm, detach-mean, detach-std and LayerNorm-simple (unbiased) through the
   adanorm_triton ops, fp32 / bf16 / fp16, forward and input gradient against the float64
   reference (tests/reference.py); torch.compile(fullgraph=True) of AdaNorm.
2. Paired timings (median of interleaved rounds, CUDA events via triton.testing.do_bench):
   AdaNorm and DetachNorm fwd+bwd vs native F.layer_norm(x, shape) without affine, and fwd, at the
   CPU benchmark's shapes plus (16384, 4096), in fp32 and bf16.
3. Achieved bandwidth of AdaNorm fwd+bwd at bf16 (16384, 4096) (5 x tensor bytes moved), as a
   fraction of the device's measured copy bandwidth and of its nominal HBM bandwidth.

Writes JSON to --json (default: $OUT/gpu_check.json if $OUT is set, else
benchmarks/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import adanorm.functional as AF  # noqa: E402
from adanorm import _kernels  # noqa: E402
from reference import reference_norm  # noqa: E402

SHAPES = ((2048, 256), (4096, 512), (8192, 512), (16384, 1024), (16384, 4096))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = {
    "adanorm": {"scale": 1.0, "k": 0.1},
    "detachnorm": {"detach_mean": True, "detach_std": True},
    "detach-mean": {"detach_mean": True},
    "detach-std": {"detach_std": True},
    "adanorm-unbiased": {"scale": 2.0, "k": 0.1, "std_mode": "unbiased"},
    "layernorm-simple-unbiased": {"std_mode": "unbiased"},
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
# Nominal HBM bandwidth by device name (vendor datasheets), bytes/s.
NOMINAL_HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12,
               "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12}


def nominal_bandwidth(name: str) -> float | None:
    for key, value in NOMINAL_HBM.items():
        if key in name:
            return value
    return None


def check_correctness() -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for dtype_name, dtype in DTYPES.items():
        for width in (7, 256, 1000, 4096):
            for name, kwargs in VARIANTS.items():
                kwargs = dict(kwargs)
                std_mode = kwargs.pop("std_mode", "biased")
                x = (torch.randn(64, width, device="cuda") * 3 + 1).to(dtype).requires_grad_()
                g = torch.randn(64, width, device="cuda").to(dtype)
                out = AF.normalize(x, width, std_mode=std_mode, **kwargs)
                (dx,) = torch.autograd.grad(out, x, g)
                x64 = x.detach().double().requires_grad_()
                ref = reference_norm(x64, (width,), std_mode=std_mode, **kwargs)
                (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
                sigma = x64.detach().var(-1, unbiased=False).add(1e-5).sqrt()
                gscale = max(1.0, (g.double().abs().max() / sigma.min()).item())
                err_out = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
                err_dx = ((dx.double() - ref_dx).abs().max() / gscale).item()
                rows.append({"variant": name, "dtype": dtype_name, "width": width,
                             "err_out": err_out, "err_dx": err_dx,
                             "ok": max(err_out, err_dx) <= TOLERANCE[dtype]})
    module = torch.compile(lambda t: AF.ada_norm(t, 512), fullgraph=True)
    x = torch.randn(32, 512, device="cuda", requires_grad=True)
    (dx_c,) = torch.autograd.grad(module(x).sum(), x)
    (dx_e,) = torch.autograd.grad(AF.ada_norm(x, 512).sum(), x)
    rows.append({"variant": "compile(fullgraph) adanorm", "dtype": "fp32", "width": 512,
                 "err_out": 0.0, "err_dx": (dx_c - dx_e).abs().max().item(),
                 "ok": torch.allclose(dx_c, dx_e, atol=1e-5)})
    return rows


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * src.numel() / (ms * 1e-3)


def time_cells(rounds: int) -> list[dict]:
    from triton.testing import do_bench

    cells: dict[tuple, dict] = {}
    for _ in range(rounds):
        for rows, width in SHAPES:
            for dtype_name in ("fp32", "bf16"):
                dtype = DTYPES[dtype_name]
                x = torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True)
                g = torch.randn_like(x)
                fns = {
                    "native F.layer_norm (no affine)": lambda t: F.layer_norm(t, t.shape[-1:]),
                    "adanorm": lambda t: AF.ada_norm(t, t.shape[-1]),
                    "detachnorm": lambda t: AF.detach_norm(t, t.shape[-1]),
                }
                for mode in ("fwd+bwd", "fwd"):
                    times = {}
                    for name, fn in fns.items():
                        if mode == "fwd":
                            stmt = lambda fn=fn, x=x: fn(x)  # noqa: E731
                        else:
                            stmt = lambda fn=fn, x=x, g=g: torch.autograd.grad(  # noqa: E731
                                fn(x), x, g)
                        times[name] = do_bench(stmt, warmup=5, rep=25)
                    base = times["native F.layer_norm (no affine)"]
                    for name, ms in times.items():
                        key = (name, dtype_name, mode, rows, width)
                        cell = cells.setdefault(key, {"variant": name, "dtype": dtype_name,
                                                      "mode": mode, "shape": [rows, width],
                                                      "ms": [], "ratios": []})
                        cell["ms"].append(ms)
                        cell["ratios"].append(ms / base)
    out = []
    for cell in cells.values():
        cell["median_ms"] = statistics.median(cell["ms"])
        cell["median_ratio"] = statistics.median(cell["ratios"])
        out.append(cell)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks/results")
    parser.add_argument("--json", type=Path, default=default_dir / "gpu_check.json")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    start = time.time()
    ready = _kernels.cuda_kernels_ready()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; triton kernels ready: {ready}", flush=True)
    result: dict = {"device": name, "torch": torch.__version__, "triton_ready": ready}
    result["correctness"] = correctness = check_correctness()
    bad = [r for r in correctness if not r["ok"]]
    print(f"correctness: {len(correctness) - len(bad)}/{len(correctness)} ok "
          f"({time.time() - start:.0f} s)", flush=True)
    for r in bad:
        print("  FAILED", r, flush=True)
    result["copy_bandwidth_Bps"] = bandwidth = copy_bandwidth()
    result["cells"] = cells = time_cells(args.rounds)
    print(f"\npaired median ratio vs native F.layer_norm(x, shape) without affine "
          f"({args.rounds} rounds):")
    for c in cells:
        if c["variant"].startswith("native"):
            continue
        print(f"  {c['variant']:<11} {c['dtype']} {c['mode']:<8} {c['shape']}: "
              f"{c['median_ratio']:.3f}x  ({c['median_ms']:.4f} ms)")
    target = next(c for c in cells if c["variant"] == "adanorm" and c["dtype"] == "bf16"
                  and c["mode"] == "fwd+bwd" and c["shape"] == [16384, 4096])
    moved = 5 * 16384 * 4096 * 2
    achieved = moved / (target["median_ms"] * 1e-3)
    nominal = nominal_bandwidth(name)
    result["hbm"] = {"achieved_Bps": achieved, "copy_Bps": bandwidth, "nominal_Bps": nominal,
                     "fraction_of_copy": achieved / bandwidth,
                     "fraction_of_nominal": None if nominal is None else achieved / nominal}
    print(f"\nAdaNorm bf16 (16384, 4096) fwd+bwd: {achieved / 1e9:.0f} GB/s = "
          f"{100 * achieved / bandwidth:.0f} % of measured copy ({bandwidth / 1e9:.0f} GB/s)"
          + ("" if nominal is None else f", {100 * achieved / nominal:.0f} % of nominal HBM"))
    fwd_bwd = [c for c in cells if c["variant"] == "adanorm" and c["mode"] == "fwd+bwd"]
    worst = max(c["median_ratio"] for c in fwd_bwd)
    print(f"AdaNorm fwd+bwd worst ratio {worst:.3f}x (target <= 1.05x); "
          f"total {time.time() - start:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
