"""The paper's figure 1 for the LM task: train and valid BPC over training, LayerNorm vs
LayerNorm-simple (mean over seeds, band from the lowest to the highest seed).

``python -m adanorm.lab.tasks.lm.plots SWEEP_DIR OUT.png`` reads ``SWEEP_DIR/<dataset>/<norm>/
seed*/metrics.jsonl`` as written by ``adanorm sweep``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ...plots import NORM_COLORS, display_name, read_metrics

__all__ = ["bpc_curves", "plot_bpc_figure", "main"]


def bpc_curves(runs: Sequence[Sequence[dict]], split: str) -> tuple[list[int], list[list[float]]]:
    """Steps logged by every run for ``split``, and each run's BPC at those steps."""
    per_run = [{r["step"]: r["bpc"] for r in records if r.get("split") == split}
               for records in runs]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in per_run)))
    return steps, [[c[s] for s in steps] for c in per_run]


def plot_bpc_figure(sweep_dir: Path, out: Path, norms: Sequence[str] = (
        "layernorm", "layernorm-simple")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    if len(datasets) != 1:
        raise ValueError(f"{sweep_dir}: expected one dataset directory, found {datasets}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for norm in norms:
        runs = [read_metrics(p) for p in sorted((datasets[0] / norm).glob("seed*/metrics.jsonl"))]
        if not runs:
            raise ValueError(f"{datasets[0] / norm}: no runs with metrics.jsonl")
        for ax, split in zip(axes, ("train", "valid"), strict=True):
            steps, values = bpc_curves(runs, split)
            arr = np.asarray(values, dtype=float)
            color = NORM_COLORS.get(norm)
            ax.plot(steps, arr.mean(0), color=color, lw=1.6, marker="o" if split == "valid"
                    else None, ms=3, label=f"{display_name(norm)} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, arr.min(0), arr.max(0), color=color, alpha=0.15, lw=0)
    for ax, split in zip(axes, ("train", "valid"), strict=True):
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel(f"{split} BPC")
        ax.set_title(f"{datasets[0].name}: {split} BPC")
        ax.grid(True, alpha=0.3)
    # The first logs are far above the rest: show the part of training where the norms differ.
    for ax in axes:
        lines = [line.get_ydata() for line in ax.get_lines()]
        tail = np.concatenate([y[len(y) // 3 :] for y in lines])
        ax.set_ylim(tail.min() - 0.05, tail.max() + 0.1)
    axes[1].legend(frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(plot_bpc_figure(args.sweep_dir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
