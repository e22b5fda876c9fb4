"""The paper's figure 2 for the parsing task: train and valid loss of AdaNorm vs LayerNorm.

``python -m adanorm.lab.tasks.parsing.plots SWEEP_DIR OUT.png [--dataset ewt]`` reads every
finished run (``results.json`` + ``metrics.jsonl``) of LayerNorm and AdaNorm under ``SWEEP_DIR``
and draws two panels on a linear axis against epochs, as the paper does: the per-transition
training loss (logged every ``train.log_every`` updates, dropout on) and the per-transition
validation loss on the oracle transitions of the dev sentences (dropout off).  Lines are means over
seeds, bands span the lowest to the highest seed.  The train panel's y axis starts at a quarter
epoch (the first updates' loss is ~10x larger).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ... import plots as lab_plots

__all__ = ["plot_figure2", "main"]

NORMS = ("layernorm", "adanorm")


def _runs(sweep: Path, dataset: str) -> dict[str, list[tuple[float, list[dict]]]]:
    """norm label -> [(updates per epoch, metrics records)] for LayerNorm and AdaNorm runs."""
    out: dict[str, list[tuple[float, list[dict]]]] = defaultdict(list)
    for path in sorted(sweep.rglob("results.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result["dataset"] != dataset or result["norm"] not in NORMS:
            continue
        per_epoch = result["steps"] / max(result["epochs_completed"], 1)
        records = lab_plots.read_metrics(path.parent / "metrics.jsonl")
        out[result["norm_label"]].append((per_epoch, records))
    return out


def plot_figure2(sweep: Path, out: Path, dataset: str = "ewt") -> Path:
    import numpy as np

    plt = lab_plots.pyplot()
    runs = _runs(sweep, dataset)
    if not runs:
        raise FileNotFoundError(f"no finished LayerNorm or AdaNorm runs on {dataset} in {sweep}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, split in zip(axes, ("train", "valid"), strict=True):
        for label in sorted(runs, key=lambda lab: NORMS.index(lab.partition("(")[0])):
            members = runs[label]
            curves = [records for _, records in members]
            steps, values = lab_plots.curves_at_common_steps(curves, split)
            if not steps:
                continue
            lab_plots.draw_mean_band(
                ax,
                np.asarray(steps) / members[0][0],  # in epochs
                values,
                color=lab_plots.NORM_COLORS.get(label.partition("(")[0]),
                label=f"{lab_plots.display_name(label)} (n={len(members)})",
                marker="o" if len(steps) <= 12 else None,
                band_alpha=0.2,
            )
        if split == "train" and ax.lines:
            # The first updates (loss ~3.5) would flatten everything after them: the axis shows
            # the range from a quarter epoch on, as the paper's 0-0.30 axis does.
            later = [
                y
                for line in ax.lines
                for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
                if x >= 0.25
            ]
            if later:
                ax.set_ylim(0.0, 1.05 * max(later))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} loss (per transition)")
        ax.set_title(f"{dataset}: {split} loss")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    return lab_plots.save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    return lab_plots.figure_cli(__doc__.split("\n\n")[0], plot_figure2, argv, dataset="ewt")


if __name__ == "__main__":
    raise SystemExit(main())
