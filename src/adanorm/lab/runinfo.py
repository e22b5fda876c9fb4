"""What is saved next to every run so that a number can be traced back to its code and setup."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .bf16_cpu import bf16_matmul

__all__ = ["git_state", "cpu_model", "environment", "norm_label"]


def git_state(start: Path | None = None) -> dict[str, Any]:
    """The git commit of the adanorm source tree, and whether it has uncommitted changes."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    import adanorm

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adanorm": adanorm.__version__,
    }
    for name in ("numpy", "yaml", "sklearn"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    info: dict[str, Any] = {
        "versions": versions,
        "device": str(device),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_model()
        # How bf16 autocast multiplies matrices here (adanorm.lab.bf16_cpu): the two paths agree
        # up to fp32 summation order, but a reader comparing machines should see which ran.
        info["bf16_matmul"] = bf16_matmul()
    # Which kernel computes each norm here, and why (a failed C++ build is recorded, not only
    # warned about once).
    info["adanorm_backends"] = adanorm.backend_info()
    return info


def norm_label(norm: str, norm_kwargs: dict[str, Any] | None) -> str:
    """The row label of a norm in tables: its name, plus its keyword arguments if any."""
    if not norm_kwargs:
        return norm
    args = ",".join(
        f"{'C' if k == 'scale' else k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
        for k, v in sorted(norm_kwargs.items())
    )
    return f"{norm}({args})"
