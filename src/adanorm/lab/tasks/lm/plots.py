"""The paper's figure 1 for the LM task: train and valid BPC over training, LayerNorm vs
LayerNorm-simple (mean over seeds, band from the lowest to the highest seed).

``python -m adanorm.lab.tasks.lm.plots SWEEP_DIR OUT.png`` reads ``SWEEP_DIR/<dataset>/<norm>/
seed*/metrics.jsonl`` as written by ``adanorm sweep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ... import plots as lab_plots

__all__ = ["plot_bpc_figure", "main"]


def plot_bpc_figure(sweep_dir: Path, out: Path, norms: Sequence[str] = (
        "layernorm", "layernorm-simple")) -> Path:
    import numpy as np

    plt = lab_plots.pyplot()
    datasets = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    if len(datasets) != 1:
        raise ValueError(f"{sweep_dir}: expected one dataset directory, found {datasets}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for norm in norms:
        paths = sorted((datasets[0] / norm).glob("seed*/metrics.jsonl"))
        runs = [lab_plots.read_metrics(p) for p in paths]
        if not runs:
            raise ValueError(f"{datasets[0] / norm}: no runs with metrics.jsonl")
        for ax, split in zip(axes, ("train", "valid"), strict=True):
            steps, values = lab_plots.curves_at_common_steps(runs, split, "bpc")
            lab_plots.draw_mean_band(
                ax, steps, values, color=lab_plots.NORM_COLORS.get(norm),
                label=f"{lab_plots.display_name(norm)} (n={len(runs)})",
                marker="o" if split == "valid" else None, band_alpha=0.15,
            )
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
    return lab_plots.save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    return lab_plots.figure_cli(__doc__.split("\n\n")[0], plot_bpc_figure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
