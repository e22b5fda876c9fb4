"""``adanorm demo``: the five norms of the paper on real data that ships with scikit-learn.

Trains the digits task (:mod:`adanorm.lab.tasks.vision.digits`) with LayerNorm, LayerNorm-simple,
w/o Norm, DetachNorm and AdaNorm for a few seeds each, in this process, then writes the report
(table + loss curves) into the output directory.  Finished runs are reused on a second call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from .config import load_config
from .paper_numbers import PAPER_NORMS
from .report import Report, write_report
from .trainer import Trainer

__all__ = ["run_demo"]


def run_demo(
    out: Path,
    *,
    seeds: int = 3,
    threads: int = 1,
    norms: Sequence[str] = PAPER_NORMS,
    preset: str = "cpu",
    verbose: bool = True,
) -> Report:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    runs_root = out / "runs"
    for norm in norms:
        for seed in range(1, seeds + 1):
            run_dir = runs_root / "digits" / norm / f"seed{seed}"
            if (run_dir / "results.json").exists():
                continue
            cfg = load_config(
                "digits",
                preset,
                [
                    f"model.norm={norm}",
                    f"seed={seed}",
                    f"train.threads={threads}",
                    "train.progress=false",
                ],
            )
            started = time.perf_counter()
            results = Trainer(cfg, run_dir, resume=True, argv=["adanorm", "demo"]).fit()
            if verbose:
                print(
                    f"  {norm:<17} seed {seed}: test acc {results['test']['acc']:6.2f} %  "
                    f"({time.perf_counter() - started:4.1f}s)",
                    flush=True,
                )
    return write_report(runs_root, out)
