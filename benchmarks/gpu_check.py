"""One-shot GPU check of the CUDA path: correctness, kernel tuning, paired timings, end to end.

Run through ``benchmarks/gpu_check.sh`` (which also runs the lab smoke on CUDA).  On the current
CUDA device, in this order, writing everything to one JSON file as it goes:

1. **correctness** of the public functional path (the CUDA C++ kernels, Triton where nvcc is
   missing) against the float64 reference, for every variant x std_mode x fp32/bf16/fp16 x
   several widths; the **cuda_cpp_sweep** of ``adanorm::norm`` itself over widths 1 to 16384 at
   every launch-shape boundary, aligned, misaligned and sliced inputs; rows of huge
   magnitude (1e19 to 3e38 in fp32); near-constant rows in unbiased mode (sigma 1e-8 to 1e-2);
   second derivatives (fp32 against float64); ``torch.compile(fullgraph=True)`` (inductor) and
   ``torch.export``; that the eager path runs a fused autograd node (C++ or Triton).
2. **tuning**: for every BLOCK, element size and direction, the forward/backward kernels at each
   candidate warp count (median device time), with the compiler's register and spill counts; the
   fastest count is installed for the rest of the run and recorded (``tuning``).
3. **timings**, paired and interleaved over rounds (median of per-round ratios against native
   ``F.layer_norm(x, shape)`` without affine): AdaNorm, DetachNorm, native LayerNorm with affine
   and ``torch.compile`` of a naive AdaNorm, fwd+bwd and fwd, fp32 and bf16, at six shapes.
   Two clocks: ``wall`` (triton.testing.do_bench: CUDA events around each call, L2 flushed
   between calls, so host overhead shows where it exceeds the GPU work) and ``device`` (the queue
   pre-filled behind a sleep kernel, so only GPU execution is timed).
4. **host enqueue** per call (perf_counter over many calls without synchronizing), fwd+bwd and
   fwd, paired rounds, at a shape where the host is the bottleneck: the functional forms against
   ``F.layer_norm``, the ``AdaNorm``/``DetachNorm`` modules against ``nn.LayerNorm``.
5. **bandwidth** of AdaNorm fwd+bwd at bf16 (16384, 4096) and (32768, 8192): 5 tensor passes
   over device time, against a measured device-to-device copy.
6. **end to end**: the lm ``paper`` model (12-layer Transformer-XL, d 512, tgt_len 512, mem_len
   512, batch 22) under bf16 autocast, one Adam step per iteration, AdaNorm vs LayerNorm, paired.

Writes ``--json`` (default: ``$OUT/gpu_check.json`` if ``$OUT`` is set, else
``benchmarks/results/gpu_check.json``) and prints a summary with every target's verdict.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import adanorm
import adanorm.functional as AF
from adanorm import _kernels
from adanorm.reference import normalize_ref

SHAPES = ((2048, 256), (4096, 512), (8192, 512), (16384, 1024), (16384, 4096), (32768, 8192))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = {
    "adanorm": {"scale": 1.0, "k": 0.1},
    "adanorm-c2": {"scale": 2.0, "k": 0.1},
    "detachnorm": {"detach_mean": True, "detach_std": True},
    "detach-mean": {"detach_mean": True},
    "detach-std": {"detach_std": True},
    "layernorm-simple": {},
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
TUNE_CANDIDATES = {256: (1, 2, 4), 512: (1, 2, 4), 1024: (2, 4, 8), 2048: (4, 8, 16),
                   4096: (4, 8, 16), 8192: (8, 16, 32), 16384: (8, 16, 32), 32768: (16, 32),
                   65536: (16, 32)}
NATIVE = "native F.layer_norm (no affine)"
NATIVE_MODULE = "nn.LayerNorm module (no affine)"


def log(message: str) -> None:
    print(message, flush=True)


class Recorder:
    """The result dict, rewritten atomically after every section so a timeout loses little."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


# ---- 1. correctness --------------------------------------------------------------------------


def _relative_errors(x, g, kwargs, std_mode, out, dx):
    x64 = x.detach().double().requires_grad_()
    ref = normalize_ref(x64, x.shape[-1], std_mode=std_mode, **kwargs)
    (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
    err_out = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
    err_dx = ((dx.double() - ref_dx).abs().max() / ref_dx.abs().max().clamp_min(1e-30)).item()
    return err_out, err_dx


def _case(dtype_name: str, width: int, name: str, std_mode: str) -> dict:
    dtype = DTYPES[dtype_name]
    kwargs = VARIANTS[name]
    gen = torch.Generator(device="cuda").manual_seed(hash((dtype_name, width, name)) % 2**31)
    # One column more, then sliced off: the data starts off a 16-byte boundary.
    x = (torch.randn(64, width + 1, device="cuda", generator=gen) * 3 + 1).to(dtype)
    x = x[:, 1:] if width % 2 else x[:, :width].contiguous()
    x.requires_grad_()
    g = torch.randn(64, width, device="cuda", generator=gen).to(dtype)
    out = AF.normalize(x, width, std_mode=std_mode, **kwargs)
    backward_node = type(out.grad_fn).__name__ if out.grad_fn is not None else "None"
    (dx,) = torch.autograd.grad(out, x, g)
    err_out, err_dx = _relative_errors(x, g, kwargs, std_mode, out.float(), dx.float())
    tolerance = TOLERANCE[dtype] * (4 if std_mode == "unbiased" else 1)
    return {"check": "values", "variant": name, "std_mode": std_mode, "dtype": dtype_name,
            "width": width, "err_out": err_out, "err_dx": err_dx, "backward_node": backward_node,
            "ok": out.dtype == dtype and max(err_out, err_dx) <= tolerance}


def _magnitude_case(magnitude: float, std_mode: str) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(32, 1000, device="cuda", generator=gen).mul(magnitude / 4)
    x = x.clamp(-3.3e38, 3.3e38).requires_grad_()
    g = torch.randn(32, 1000, device="cuda", generator=gen)
    out = AF.ada_norm(x, 1000, std_mode=std_mode)
    (dx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_()
    ref = normalize_ref(x64, 1000, std_mode=std_mode, scale=1.0)
    (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
    err_out = (out.double() - ref).abs().max().item()
    # dx ~ g / sigma is tiny for such rows: compare relative to its own size.
    err_dx = ((dx.double() - ref_dx).abs().max() / ref_dx.abs().max()).item()
    return {"check": "huge magnitude", "magnitude": magnitude, "std_mode": std_mode,
            "err_out": err_out, "err_dx": err_dx,
            "ok": err_out <= 1e-5 and (err_dx <= 1e-4 or magnitude > 1e37)}


def _near_constant_case(sigma: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = (1.0 + sigma * torch.randn(64, 512, device="cuda", generator=gen)).requires_grad_()
    g = torch.randn(64, 512, device="cuda", generator=gen)
    out = AF.layer_norm_simple(x, 512, std_mode="unbiased")
    (dx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double()
    keep = x64.std(-1) > 0  # rows the fp32 rounding made exactly constant have no gradient
    x64 = x64[keep].requires_grad_()
    ref = normalize_ref(x64, 512, std_mode="unbiased")
    (ref_dx,) = torch.autograd.grad(ref, x64, g[keep].double())
    err_out = (out[keep].double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    err_dx = ((dx[keep].double() - ref_dx).abs().max() / ref_dx.abs().max()).item()
    return {"check": "near-constant unbiased", "sigma": sigma, "err_out": err_out,
            "err_dx": err_dx, "ok": max(err_out, err_dx) <= 1e-4}


def _double_backward_case(name: str, std_mode: str) -> dict:
    kwargs = VARIANTS[name]
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(16, 300, device="cuda", generator=gen).requires_grad_()
    g = torch.randn(16, 300, device="cuda", generator=gen).requires_grad_()
    v = torch.randn(16, 300, device="cuda", generator=gen)
    out = AF.normalize(x, 300, std_mode=std_mode, **kwargs)
    (dx,) = torch.autograd.grad(out, x, g, create_graph=True)
    hx, hg = torch.autograd.grad((dx * v).sum(), (x, g), allow_unused=True)
    x64 = x.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    ref = normalize_ref(x64, 300, std_mode=std_mode, **kwargs)
    (rdx,) = torch.autograd.grad(ref, x64, g64, create_graph=True)
    rhx, rhg = torch.autograd.grad((rdx * v.double()).sum(), (x64, g64), allow_unused=True)

    def err(a, b):
        a = torch.zeros_like(x64) if a is None else a.double()
        b = torch.zeros_like(x64) if b is None else b
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()

    e_x, e_g = err(hx, rhx), err(hg, rhg)
    return {"check": "double backward", "variant": name, "std_mode": std_mode,
            "err_hx": e_x, "err_hg": e_g, "ok": max(e_x, e_g) <= 1e-4}


def _compile_export_checks() -> list[dict]:
    rows = []
    for name, fn in (("adanorm", lambda t: AF.ada_norm(t, 512)),
                     ("detachnorm", lambda t: AF.detach_norm(t, 512))):
        x = torch.randn(64, 512, device="cuda", requires_grad=True)
        try:
            compiled = torch.compile(fn, fullgraph=True)
            (dx_c,) = torch.autograd.grad(compiled(x).square().sum(), x)
            (dx_e,) = torch.autograd.grad(fn(x).square().sum(), x)
            err = (dx_c - dx_e).abs().max().item()
            rows.append({"check": "compile(fullgraph, inductor)", "variant": name,
                         "err_dx": err, "ok": err <= 1e-4})
        except Exception as error:  # recorded, not fatal: later sections still run
            rows.append({"check": "compile(fullgraph, inductor)", "variant": name,
                         "error": f"{type(error).__name__}: {str(error)[:500]}", "ok": False})

        class Wrapped(torch.nn.Module):
            def forward(self, t, fn=fn):
                return fn(t)

        try:
            program = torch.export.export(Wrapped(), (x.detach(),))
            err = (program.module()(x.detach()) - fn(x.detach())).abs().max().item()
            rows.append({"check": "export", "variant": name, "err_out": err, "ok": err <= 1e-5})
        except Exception as error:
            rows.append({"check": "export", "variant": name,
                         "error": f"{type(error).__name__}: {str(error)[:500]}", "ok": False})
    return rows


def check_correctness() -> list[dict]:
    # 7, 33 and 4099: element-wise loads (warp per row, then block per row); 1000, 16384: 16-byte
    # vectors where the layout allows (see _case).
    widths = {"fp32": (7, 33, 1000, 4099, 16384), "bf16": (7, 1000, 4099, 16384),
              "fp16": (33, 1000)}
    jobs = [(dtype, width, name, std_mode)
            for dtype in DTYPES for width in widths[dtype]
            for name in VARIANTS for std_mode in ("biased", "unbiased")]
    # Threads overlap the Triton compilations (ptxas runs as a subprocess).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda job: _case(*job), jobs))
        rows += list(pool.map(lambda m: _magnitude_case(*m),
                              [(m, s) for m in (1e19, 1e30, 3e38) for s in ("biased", "unbiased")]))
        rows += list(pool.map(_near_constant_case, (1e-8, 1e-6, 1e-4, 1e-2)))
        rows += list(pool.map(lambda job: _double_backward_case(*job),
                              [(n, s) for n in VARIANTS for s in ("biased", "unbiased")]))
    torch.cuda.synchronize()
    rows += _compile_export_checks()
    x = torch.randn(8, 512, device="cuda", requires_grad=True)
    nodes = {name: _backward_nodes(fn(x)) for name, fn in (
        ("adanorm", lambda t: AF.ada_norm(t, 512)),
        ("detachnorm", lambda t: AF.detach_norm(t, 512)),
        ("adanorm bf16", lambda t: AF.ada_norm(t.bfloat16(), 512)))}
    # The C++ autograd node is named CppFunction by torch; the Triton one _TritonNormFunction.
    rows.append({"check": "eager path is a fused autograd node", "backend": _cuda_backend_now(),
                 "backward_nodes": nodes,
                 "ok": all(any(n in ("CppFunction", "_TritonNormFunctionBackward") for n in v)
                           for v in nodes.values())})
    return rows


# Widths around every boundary of norm_cuda.cu's launch shapes: element-wise (odd) widths on
# either side of the warp-per-row limits, 16-byte vector widths of both row modes, the widest row.
SWEEP_WIDTHS = (1, 2, 31, 33, 255, 256, 257, 1000, 1023, 1024, 1025, 1032, 2048, 4095, 4096,
                8193, 16384)
SWEEP_LAYOUTS = ("contiguous", "offset", "sliced")


def _sweep_input(rows: int, width: int, dtype: torch.dtype, layout: str, gen) -> torch.Tensor:
    """``rows`` x ``width`` values in one of three memory layouts: a fresh tensor (16-byte
    aligned), a contiguous view one element into its storage (misaligned: element-wise loads, no
    copy), or a column slice ``x[:, 1:]`` (not contiguous: the op copies it)."""
    if layout == "contiguous":
        return (torch.randn(rows, width, device="cuda", generator=gen) * 3 + 1).to(dtype)
    if layout == "offset":
        flat = (torch.randn(rows * width + 1, device="cuda", generator=gen) * 3 + 1).to(dtype)
        return flat[1:].view(rows, width)
    wide = (torch.randn(rows, width + 1, device="cuda", generator=gen) * 3 + 1).to(dtype)
    return wide[:, 1:]


def _sweep_case(dtype_name: str, width: int, layout: str) -> list[dict]:
    """adanorm::norm itself (the CUDA C++ kernels and their C++ autograd), every variant and
    std_mode, forward and input gradient against the float64 reference; 3 x 13 rows, so the
    warp-per-row grid has a partly filled last block."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(width * 7 + len(layout))
    x2 = _sweep_input(39, width, dtype, layout, gen)
    g2 = _sweep_input(39, width, dtype, "offset" if layout == "offset" else "contiguous", gen)
    x = x2.view(3, 13, width) if x2.is_contiguous() else x2.unflatten(0, (3, 13))
    g = g2.view(3, 13, width)
    rows = []
    for name, kwargs in VARIANTS.items():
        for std_mode in ("biased", "unbiased"):
            if std_mode == "unbiased" and width < 2:
                continue
            leaf = x.detach().requires_grad_()
            out = torch.ops.adanorm.norm.default(
                leaf, 1e-5, std_mode == "unbiased", kwargs.get("detach_mean", False),
                kwargs.get("detach_std", False), kwargs.get("scale"), kwargs.get("k", 0.1))
            (dx,) = torch.autograd.grad(out, leaf, g)
            x64 = leaf.detach().double().requires_grad_()
            ref = normalize_ref(x64, width, std_mode=std_mode, **kwargs)
            (ref_dx,) = torch.autograd.grad(ref, x64, g.double())
            err_out = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()
            # dx against the size of its terms, g / sigma: at width 2 the terms cancel to nearly
            # 0 (y = +-1), and a max-relative error would measure that cancellation.
            terms = g.double().abs() / (x64.detach().var(-1, unbiased=False, keepdim=True)
                                        + 1e-5).sqrt()
            scale = torch.maximum(ref_dx.abs().max(), terms.max()).clamp_min(1e-30)
            err_dx = ((dx.double() - ref_dx).abs().max() / scale).item()
            tolerance = TOLERANCE[dtype] * (4 if std_mode == "unbiased" else 1)
            rows.append({"check": "cuda-cpp sweep", "variant": name, "std_mode": std_mode,
                         "dtype": dtype_name, "width": width, "layout": layout,
                         "err_out": err_out, "err_dx": err_dx,
                         "ok": out.dtype == dtype and out.shape == x.shape
                         and max(err_out, err_dx) <= tolerance})
    return rows


def check_cuda_cpp_sweep() -> list[dict]:
    if _kernels._cuda_cpp_state is not True:
        return [{"check": "cuda-cpp sweep", "ok": False,
                 "error": f"CUDA C++ kernels not loaded: {_kernels.cuda_status()}"}]
    rows = []
    for dtype_name in DTYPES:
        for width in SWEEP_WIDTHS:
            for layout in SWEEP_LAYOUTS:
                rows += _sweep_case(dtype_name, width, layout)
    return rows


def _cuda_backend_now() -> str | None:
    return _kernels.cuda_backend(512)


class use_triton:
    """Route the fused CUDA path to the Triton kernels for the duration (comparison only)."""

    def __enter__(self):
        self.saved = _kernels._cuda_cpp_state
        _kernels.cuda_kernels_ready()
        _kernels._triton_ready()
        _kernels._cuda_cpp_state = False
        return self

    def __exit__(self, *exc):
        _kernels._cuda_cpp_state = self.saved


def check_triton_correctness() -> list[dict]:
    """The Triton kernels (the fallback when the C++ kernels cannot be built), briefly."""
    with use_triton():
        jobs = [(dtype, 1000, name, std_mode) for dtype in ("fp32", "bf16")
                for name in VARIANTS for std_mode in ("biased", "unbiased")]
        rows = [_case(*job) for job in jobs]
        rows += [_magnitude_case(3e38, "biased"), _near_constant_case(1e-6),
                 _double_backward_case("adanorm", "unbiased")]
        x = torch.randn(8, 512, device="cuda", requires_grad=True)
        nodes = _backward_nodes(AF.ada_norm(x, 512))
        rows.append({"check": "Triton path active", "backward_nodes": nodes,
                     "ok": any("TritonNorm" in n for n in nodes)})
    return rows


def _backward_nodes(out: torch.Tensor, depth: int = 3) -> list[str]:
    names, frontier = [], [out.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names += [type(f).__name__ for f in frontier]
        frontier = [n for f in frontier for n, _ in f.next_functions]
    return names


# ---- 2. tuning ---------------------------------------------------------------------------------


_cycles_per_ms: float | None = None


def _sleep_cycles_per_ms() -> float:
    """The GPU's sleep-kernel cycles per millisecond, measured once."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        torch.cuda.synchronize()
        _cycles_per_ms = 20_000_000 / start.elapsed_time(end)
    return _cycles_per_ms


def _sleep_then_time(stmt, calls: int, sleep_ms: float) -> tuple[float, float]:
    """(milliseconds per call of GPU execution, host milliseconds spent enqueueing): the host
    enqueues ``calls`` calls behind a sleep kernel of ``sleep_ms``, so the events time the GPU
    alone as long as the enqueueing took less than the sleep."""
    stmt()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_ms * _sleep_cycles_per_ms()))
    start.record()
    host_start = time.perf_counter()
    for _ in range(calls):
        stmt()
    host_ms = (time.perf_counter() - host_start) * 1e3
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, host_ms


def device_ms(stmt, target_ms: float = 30.0) -> float:
    """Median over 3 batches of :func:`_sleep_then_time`.  A first probe behind a long sleep
    gives the GPU time and the host time per call; the batch size then keeps both the GPU work
    near ``target_ms`` and the enqueueing well inside the sleep (and the launch queue), so the
    host never shows in this clock."""
    probe, host_ms = _sleep_then_time(stmt, 3, sleep_ms=10.0)
    host_per_call = host_ms / 3
    # At most 100 calls: a fwd+bwd launches a handful of kernels, and the queue holds ~1000.
    calls = int(min(max(target_ms / max(probe, 1e-3), 5), 100))
    sleep_ms = 1.5 * calls * host_per_call + 2.0
    batches = [_sleep_then_time(stmt, calls, sleep_ms) for _ in range(3)]
    if any(host > sleep_ms for _, host in batches):  # a stall on the host: time it again
        sleep_ms = 3 * max(host for _, host in batches)
        batches = [_sleep_then_time(stmt, calls, sleep_ms) for _ in range(3)]
    return statistics.median(ms for ms, _ in batches)


def tune() -> dict:
    from adanorm._kernels import triton_norm as tn

    results = []
    chosen = {}
    for dtype_name in ("fp32", "bf16"):
        dtype = DTYPES[dtype_name]
        size = torch.empty((), dtype=dtype).element_size()
        for block, candidates in TUNE_CANDIDATES.items():
            rows = max(512, (2**28 // size) // block // 2)  # ~128 MiB per tensor
            x = torch.randn(rows, block, device="cuda", dtype=dtype)
            g = torch.randn_like(x)
            out = torch.empty_like(x)
            rstd = torch.empty(0, device="cuda")
            for direction in ("fwd", "bwd"):
                timings = {}
                for warps in candidates:
                    def launch(warps=warps, direction=direction, x=x, g=g, out=out, rows=rows,
                               block=block, rstd=rstd):
                        if direction == "fwd":
                            return tn._forward_kernel[(rows,)](
                                x, out, rstd, x.stride(0), out.stride(0), block, 1e-5, 1.0, 0.1,
                                RESCALE_ABOVE=tn._RESCALE_ABOVE, UNBIASED=False, ADA=True,
                                STORE_RSTD=False, BLOCK=block, num_warps=warps)
                        return tn._backward_kernel[(rows,)](
                            g, x, rstd, out, g.stride(0), x.stride(0), out.stride(0), block,
                            1e-5, 1.0, 0.1, RESCALE_ABOVE=tn._RESCALE_ABOVE, UNBIASED=False,
                            ADA=True, DETACH_MEAN=False, DETACH_STD=False, NEEDS_X=True,
                            BLOCK=block, num_warps=warps)
                    try:
                        compiled = launch()
                        ms = device_ms(launch, target_ms=15.0)
                    except Exception as error:
                        results.append({"block": block, "dtype": dtype_name,
                                        "direction": direction, "warps": warps,
                                        "error": f"{type(error).__name__}: {str(error)[:300]}"})
                        continue
                    moved = (2 if direction == "fwd" else 3) * x.numel() * size
                    row = {"block": block, "dtype": dtype_name, "direction": direction,
                           "warps": warps, "ms": ms, "GBps": moved / ms / 1e6,
                           "n_regs": getattr(compiled, "n_regs", None),
                           "n_spills": getattr(compiled, "n_spills", None)}
                    results.append(row)
                    timings[warps] = row
                if timings:
                    best = min(timings, key=lambda w: timings[w]["ms"])
                    chosen[(block, size, direction)] = best
            del x, g, out
            torch.cuda.empty_cache()
    tn.WARPS.update(chosen)
    tn._config_cache.clear()
    spill_free = {}
    for size in (4, 2):
        ok_blocks = [b for b in TUNE_CANDIDATES
                     if all(any(r.get("n_spills") == 0 and r["block"] == b and r["warps"] ==
                                chosen.get((b, size, d)) and
                                DTYPES[r["dtype"]].itemsize == size for r in results
                                if "ms" in r) for d in ("fwd", "bwd"))]
        spill_free[size] = max(ok_blocks) if ok_blocks else None
    return {"measurements": results,
            "chosen": [{"block": b, "element_size": s, "direction": d, "warps": w}
                       for (b, s, d), w in sorted(chosen.items())],
            "widest_spill_free_block": spill_free}


# ---- 3. timings -------------------------------------------------------------------------------


def _naive_adanorm(t: torch.Tensor, scale: float = 1.0, k: float = 0.1) -> torch.Tensor:
    x = t.float()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + 1e-5)
    return (y * (scale * (1 - k * y)).detach()).to(t.dtype)


def time_cells(rounds: int) -> list[dict]:
    from triton.testing import do_bench

    compiled_naive = torch.compile(_naive_adanorm)
    cells: dict[tuple, dict] = {}
    for round_index in range(rounds):
        for rows, width in SHAPES:
            for dtype_name in ("fp32", "bf16"):
                dtype = DTYPES[dtype_name]
                x = torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True)
                g = torch.randn_like(x)
                w = torch.ones(width, device="cuda", dtype=dtype, requires_grad=True)
                b = torch.zeros(width, device="cuda", dtype=dtype, requires_grad=True)
                fns = {
                    NATIVE: (lambda t: F.layer_norm(t, t.shape[-1:]), (x,)),
                    "native F.layer_norm (affine)": (
                        lambda t, w=w, b=b: F.layer_norm(t, t.shape[-1:], w, b), (x, w, b)),
                    "adanorm": (lambda t: AF.ada_norm(t, t.shape[-1]), (x,)),
                    "detachnorm": (lambda t: AF.detach_norm(t, t.shape[-1]), (x,)),
                    "torch.compile naive adanorm": (compiled_naive, (x,)),
                    "adanorm (triton)": (lambda t: AF.ada_norm(t, t.shape[-1]), (x,)),
                }
                names = list(fns)
                # Rotate the order every round so no variant always runs first.
                shift = round_index % len(names)
                names = names[shift:] + names[:shift]
                for mode in ("fwd+bwd", "fwd"):
                    times = {}
                    for name in names:
                        fn, inputs = fns[name]
                        if mode == "fwd":
                            def stmt(fn=fn, x=x):
                                with torch.no_grad():
                                    return fn(x)
                        else:
                            def stmt(fn=fn, inputs=inputs, x=x, g=g):
                                return torch.autograd.grad(fn(x), inputs, g)
                        with use_triton() if "triton" in name else contextlib.nullcontext():
                            stmt()
                            times[name] = {
                                "wall": do_bench(stmt, warmup=5, rep=25, return_mode="median"),
                                "device": device_ms(stmt, target_ms=10.0),
                            }
                    for name, clocks in times.items():
                        key = (name, dtype_name, mode, rows, width)
                        cell = cells.setdefault(key, {
                            "variant": name, "dtype": dtype_name, "mode": mode,
                            "shape": [rows, width], "wall_ms": [], "device_ms": [],
                            "wall_ratio": [], "device_ratio": []})
                        for clock in ("wall", "device"):
                            cell[f"{clock}_ms"].append(clocks[clock])
                            cell[f"{clock}_ratio"].append(clocks[clock] / times[NATIVE][clock])
                del x, g, w, b
        torch.cuda.empty_cache()
        log(f"  timing round {round_index + 1}/{rounds} done")
    out = []
    for cell in cells.values():
        for clock in ("wall", "device"):
            cell[f"median_{clock}_ms"] = statistics.median(cell[f"{clock}_ms"])
            cell[f"median_{clock}_ratio"] = statistics.median(cell[f"{clock}_ratio"])
        out.append(cell)
    return out


# ---- 4. host enqueue ---------------------------------------------------------------------------


def host_enqueue(rounds: int = 7, calls: int = 400) -> list[dict]:
    shape = (2048, 256)
    out = []
    for dtype_name in ("fp32", "bf16"):
        x = torch.randn(*shape, device="cuda", dtype=DTYPES[dtype_name], requires_grad=True)
        g = torch.randn_like(x)
        width = shape[1]
        fns = {NATIVE: lambda t: F.layer_norm(t, t.shape[-1:]),
               NATIVE_MODULE: torch.nn.LayerNorm(width, elementwise_affine=False).cuda(),
               "AdaNorm module": adanorm.AdaNorm(width),
               "DetachNorm module": adanorm.DetachNorm(width),
               "adanorm": lambda t: AF.ada_norm(t, t.shape[-1]),
               "detachnorm": lambda t: AF.detach_norm(t, t.shape[-1]),
               "adanorm (triton)": lambda t: AF.ada_norm(t, t.shape[-1]),
               "detachnorm (triton)": lambda t: AF.detach_norm(t, t.shape[-1])}
        samples: dict = {(n, m): [] for n in fns for m in ("fwd+bwd", "fwd")}
        for _ in range(rounds):
            for mode in ("fwd+bwd", "fwd"):
                for name, fn in fns.items():
                    backend = use_triton() if "triton" in name else contextlib.nullcontext()
                    if mode == "fwd":
                        def stmt(fn=fn, x=x):
                            with torch.no_grad():
                                fn(x)
                    else:
                        def stmt(fn=fn, x=x, g=g):
                            torch.autograd.grad(fn(x), x, g)
                    with backend:
                        for _ in range(20):
                            stmt()
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        for _ in range(calls):
                            stmt()
                        elapsed = time.perf_counter() - start
                        torch.cuda.synchronize()
                    samples[(name, mode)].append(elapsed / calls * 1e6)
        for (name, mode), values in samples.items():
            # Modules against native's module, functional forms against F.layer_norm.
            reference = NATIVE_MODULE if "module" in name else NATIVE
            base = samples[(reference, mode)]
            out.append({"variant": name, "mode": mode, "dtype": dtype_name, "shape": list(shape),
                        "reference": reference, "median_us": statistics.median(values),
                        "median_ratio": statistics.median(
                            v / b for v, b in zip(values, base, strict=True))})
    return out


def host_breakdown(calls: int = 400) -> dict:
    """Where the host time of one AdaNorm fwd+bwd goes (fp32, 2048 x 256): each piece timed on
    its own, the profiler's table, and any synchronization torch reports."""
    import warnings

    from adanorm._kernels import triton_norm as tn

    x = torch.randn(2048, 256, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    xd = x.detach()
    _, rstd = tn._forward(xd, 1e-5, False, False, 1.0, 0.1)
    pieces = {
        "native fwd (grad on)": lambda: F.layer_norm(x, (256,)),
        "native fwd+bwd": lambda: torch.autograd.grad(F.layer_norm(x, (256,)), x, g),
        "ada_norm fwd (grad on)": lambda: AF.ada_norm(x, 256),
        "ada_norm fwd (no grad)": lambda: AF.ada_norm(xd, 256),
        "ada_norm fwd+bwd": lambda: torch.autograd.grad(AF.ada_norm(x, 256), x, g),
        "triton_norm.norm fwd (grad on)": lambda: tn.norm(x, 1e-5, False, False, False, 1.0,
                                                         0.1),
        "raw _forward launch": lambda: tn._forward(xd, 1e-5, False, False, 1.0, 0.1),
        "raw _backward launch": lambda: tn._backward(g, xd, rstd, 1e-5, False, False, False,
                                                     1.0, 0.1),
        "torch.empty x2": lambda: (torch.empty_like(xd), torch.empty(0, device="cuda")),
    }
    module = adanorm.AdaNorm(256)
    pieces["AdaNorm module fwd (grad on)"] = lambda: module(x)
    pieces["AdaNorm module fwd+bwd"] = lambda: torch.autograd.grad(module(x), x, g)
    if _kernels.cuda_backend(256) == "cuda-cpp":
        op = torch.ops.adanorm.norm.default
        pieces["adanorm::norm op fwd (grad on)"] = lambda: op(x, 1e-5, False, False, False, 1.0,
                                                              0.1)
        pieces["adanorm::norm op fwd+bwd"] = lambda: torch.autograd.grad(
            op(x, 1e-5, False, False, False, 1.0, 0.1), x, g)
    out: dict = {"us_per_call": {}}
    for name, fn in pieces.items():
        samples = []
        for _ in range(5):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
        out["us_per_call"][name] = statistics.median(samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.autograd.grad(AF.ada_norm(x, 256), x, g)
            torch.autograd.grad(AF.detach_norm(x, 256), x, g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    out["sync_warnings"] = [f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in caught]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            torch.autograd.grad(AF.ada_norm(x, 256), x, g)
        torch.cuda.synchronize()
    out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "host_profile.txt").write_text(out["profile"])
    return out


# ---- 5. bandwidth -----------------------------------------------------------------------------


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), target_ms=30.0)
    return 2 * src.numel() / (ms * 1e-3)


# ---- 6. end to end ----------------------------------------------------------------------------


def end_to_end(rounds: int = 5, steps: int = 8) -> dict:
    from adanorm.lab.tasks.lm.model import TransformerXL

    batch, tgt_len, mem_len = 22, 512, 512
    models, optimizers, mems = {}, {}, {}
    for norm in ("layernorm", "adanorm"):
        torch.manual_seed(0)
        model = TransformerXL(
            vocab_size=256, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048,
            dropout=0.1, dropatt=0.0, make_norm=lambda d, norm=norm: adanorm.make_norm(norm, d),
            pre_norm=False, mem_len=mem_len).cuda()
        models[norm] = model
        optimizers[norm] = torch.optim.Adam(model.parameters(), lr=2.5e-4)
        mems[norm] = None
    data = torch.randint(0, 256, (batch, tgt_len + 1), device="cuda")

    def step(norm: str) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, mems[norm] = models[norm](data[:, :-1], mems[norm])
            loss = F.cross_entropy(logits.float().reshape(-1, 256), data[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[norm].parameters(), 0.25)
        optimizers[norm].step()
        optimizers[norm].zero_grad(set_to_none=True)

    for norm in models:
        for _ in range(3):
            step(norm)
    torch.cuda.synchronize()
    per_step = {norm: [] for norm in models}
    for round_index in range(rounds):
        order = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for norm in order:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step(norm)
            torch.cuda.synchronize()
            per_step[norm].append((time.perf_counter() - start) / steps * 1e3)
    ratios = [a / b for a, b in zip(per_step["adanorm"], per_step["layernorm"], strict=True)]
    return {"model": "TransformerXL 12x512, d_inner 2048, batch 22x512, mem 512, bf16 autocast",
            "ms_per_step": per_step, "median_ratio": statistics.median(ratios),
            "ratios": ratios}


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks/results")
    parser.add_argument("--json", type=Path, default=default_dir / "gpu_check.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run it on a machine with a GPU")
    skip = set(filter(None, args.skip.split(",")))
    start = time.time()
    import triton

    ready = _kernels.cuda_kernels_ready()
    name = torch.cuda.get_device_name()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, check=False)
    rec = Recorder(args.json)
    rec.data.update(device=name, nvidia_smi=smi.stdout.strip(), torch=torch.__version__,
                    triton=triton.__version__, cuda=torch.version.cuda, triton_ready=ready,
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"triton kernels ready: {ready}")
    rec.save()

    rec.data["cuda_status"] = _kernels.cuda_status()
    rec.data["backend_512"] = _kernels.cuda_backend(512)
    log(f"fused CUDA kernels: {json.dumps(rec.data['cuda_status'])}")
    rec.data["triton_from_numel"] = {str(k): v for k, v in _kernels._TRITON_FROM_NUMEL.items()}
    sections = [("correctness", check_correctness), ("cuda_cpp_sweep", check_cuda_cpp_sweep),
                ("triton_correctness", check_triton_correctness), ("tuning", tune),
                ("copy_bandwidth_Bps", copy_bandwidth),
                ("cells", lambda: time_cells(args.rounds)), ("host_enqueue", host_enqueue),
                ("host_breakdown", host_breakdown),
                ("end_to_end", end_to_end)]
    for key, fn in sections:
        if key in skip:
            continue
        t0 = time.time()
        try:
            rec.data[key] = fn()
        except Exception as error:
            rec.data[key] = {"error": f"{type(error).__name__}: {str(error)[:2000]}"}
            log(f"{key}: FAILED {type(error).__name__}: {str(error)[:500]}")
        rec.data.setdefault("seconds", {})[key] = round(time.time() - t0, 1)
        rec.save()
        log(f"{key}: done in {time.time() - t0:.0f} s")
    summarize(rec.data)
    rec.data["verdicts"] = verdicts(rec.data)
    rec.data["total_seconds"] = round(time.time() - start, 1)
    rec.save()
    log(f"wrote {args.json} ({time.time() - start:.0f} s)")


def verdicts(data: dict) -> dict:
    """Each target of issue #14 item 2, with the measured value; first, whether every
    correctness row passed."""
    out: dict = {}
    for key in ("correctness", "cuda_cpp_sweep", "triton_correctness"):
        rows = data.get(key)
        if isinstance(rows, list):
            bad = [r for r in rows if not r.get("ok")]
            out[f"{key}: every row ok"] = {"rows": len(rows), "failed": len(bad),
                                           "met": not bad and bool(rows)}
    cells = data.get("cells")
    if isinstance(cells, list):
        for variant in ("adanorm", "detachnorm"):
            for mode, limit in (("fwd+bwd", 1.05), ("fwd", 1.10)):
                for clock in ("wall", "device"):
                    worst = max((c for c in cells if c["variant"] == variant
                                 and c["mode"] == mode), key=lambda c: c[f"median_{clock}_ratio"])
                    out[f"{variant} {mode} {clock} <= {limit}x native"] = {
                        "worst": worst[f"median_{clock}_ratio"], "at": [worst["dtype"],
                                                                        worst["shape"]],
                        "met": worst[f"median_{clock}_ratio"] <= limit}
        for clock in ("wall", "device"):
            losses = []
            for c in cells:
                if c["variant"] != "adanorm":
                    continue
                peer = next(p for p in cells if p["variant"] == "torch.compile naive adanorm"
                            and p["dtype"] == c["dtype"] and p["mode"] == c["mode"]
                            and p["shape"] == c["shape"])
                if c[f"median_{clock}_ms"] >= peer[f"median_{clock}_ms"]:
                    losses.append([c["dtype"], c["mode"], c["shape"]])
            out[f"adanorm faster than torch.compile naive ({clock})"] = {
                "cells_not_faster": losses, "met": not losses}
        bandwidth = data.get("copy_bandwidth_Bps")
        if isinstance(bandwidth, float):
            for shape in ([16384, 4096], [32768, 8192]):
                cell = next(c for c in cells if c["variant"] == "adanorm" and c["dtype"] == "bf16"
                            and c["mode"] == "fwd+bwd" and c["shape"] == shape)
                moved = 5 * shape[0] * shape[1] * 2
                achieved = moved / (cell["median_device_ms"] * 1e-3)
                out[f"bandwidth bf16 {shape} >= 85% of copy"] = {
                    "achieved_GBps": achieved / 1e9, "copy_GBps": bandwidth / 1e9,
                    "fraction": achieved / bandwidth, "met": achieved / bandwidth >= 0.85}
    host = data.get("host_enqueue")
    if isinstance(host, list):
        for variant in ("adanorm", "detachnorm", "AdaNorm module", "DetachNorm module",
                        "adanorm (triton)", "detachnorm (triton)"):
            rows = [h for h in host if h["variant"] == variant and h["mode"] == "fwd+bwd"]
            if not rows:
                continue
            worst = max(rows, key=lambda h: h["median_ratio"])
            out[f"{variant} host enqueue fwd+bwd <= 1.2x native"] = {
                "worst": worst["median_ratio"], "us": worst["median_us"],
                "met": worst["median_ratio"] <= 1.2}
    e2e = data.get("end_to_end")
    if isinstance(e2e, dict) and "median_ratio" in e2e:
        out["lm paper step adanorm <= 1.02x layernorm"] = {"ratio": e2e["median_ratio"],
                                                           "met": e2e["median_ratio"] <= 1.02}
    return out


def summarize(data: dict) -> None:
    correctness = data.get("correctness")
    if isinstance(correctness, list):
        bad = [r for r in correctness if not r["ok"]]
        log(f"\ncorrectness: {len(correctness) - len(bad)}/{len(correctness)} ok")
        for r in bad[:30]:
            log(f"  FAILED {r}")
    sweep = data.get("cuda_cpp_sweep")
    if isinstance(sweep, list):
        bad = [r for r in sweep if not r["ok"]]
        log(f"cuda-cpp sweep (widths {SWEEP_WIDTHS} x layouts x variants x dtypes): "
            f"{len(sweep) - len(bad)}/{len(sweep)} ok")
        for r in bad[:30]:
            log(f"  FAILED {r}")
    triton_rows = data.get("triton_correctness")
    if isinstance(triton_rows, list):
        bad = [r for r in triton_rows if not r["ok"]]
        log(f"triton correctness: {len(triton_rows) - len(bad)}/{len(triton_rows)} ok")
        for r in bad[:10]:
            log(f"  FAILED {r}")
    tuning = data.get("tuning")
    if isinstance(tuning, dict) and "chosen" in tuning:
        log("tuning (block, element size, direction -> warps): " + ", ".join(
            f"{c['block']}/{c['element_size']}/{c['direction']}->{c['warps']}"
            for c in tuning["chosen"]))
        log(f"widest spill-free block: {tuning['widest_spill_free_block']}")
    cells = data.get("cells")
    if isinstance(cells, list):
        log("\npaired median ratio vs native F.layer_norm without affine (wall | device):")
        for c in cells:
            if c["variant"] in (NATIVE, "native F.layer_norm (affine)"):
                continue
            log(f"  {c['variant']:<29} {c['dtype']} {c['mode']:<7} {str(c['shape']):<14} "
                f"{c['median_wall_ratio']:.3f} | {c['median_device_ratio']:.3f}  "
                f"({c['median_wall_ms']:.4f} | {c['median_device_ms']:.4f} ms)")
    host = data.get("host_enqueue")
    if isinstance(host, list):
        log("\nhost enqueue per call:")
        for h in host:
            log(f"  {h['variant']:<32} {h['dtype']} {h['mode']:<7} {h['median_us']:.1f} us "
                f"({h['median_ratio']:.3f}x)")
    breakdown = data.get("host_breakdown")
    if isinstance(breakdown, dict) and "us_per_call" in breakdown:
        log("\nhost breakdown (us per call): " + ", ".join(
            f"{k} {v:.1f}" for k, v in breakdown["us_per_call"].items()))
        log(f"sync warnings: {breakdown['sync_warnings'][:6]}")
    e2e = data.get("end_to_end")
    if isinstance(e2e, dict):
        log(f"\nend to end: {json.dumps(e2e)[:400]}")
    log("\nverdicts:")
    for key, value in verdicts(data).items():
        log(f"  {'MET ' if value['met'] else 'MISS'} {key}: "
            f"{json.dumps({k: v for k, v in value.items() if k != 'met'})[:300]}")


if __name__ == "__main__":
    main()
