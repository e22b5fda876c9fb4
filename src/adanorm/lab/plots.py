"""Loss curves from ``metrics.jsonl`` files, in the style of the paper's figures: a train-loss
panel and a valid-loss panel side by side, one line per norm (the mean over seeds, with a band
from the lowest to the highest seed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "read_metrics",
    "plot_loss_curves",
    "loss_curves_figure",
    "NORM_COLORS",
    "curves_at_common_steps",
    "draw_mean_band",
    "pyplot",
    "save_figure",
    "figure_cli",
]

NORM_COLORS = {
    "layernorm": "#1f77b4",
    "layernorm-simple": "#2ca02c",
    "none": "#7f7f7f",
    "detachnorm": "#9467bd",
    "detach-mean": "#8c564b",
    "detach-std": "#e377c2",
    "adanorm": "#d62728",
}
NORM_NAMES = {
    "layernorm": "LayerNorm",
    "layernorm-simple": "LayerNorm-simple",
    "none": "w/o Norm",
    "detachnorm": "DetachNorm",
    "detach-mean": "detach-mean",
    "detach-std": "detach-std",
    "adanorm": "AdaNorm",
}


def display_name(label: str) -> str:
    base, _, rest = label.partition("(")
    return NORM_NAMES.get(base, base) + (f" ({rest}" if rest else "")


def read_metrics(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def curves_at_common_steps(
    runs: Sequence[Sequence[dict]], split: str, key: str = "loss"
) -> tuple[list[int], list[list[float]]]:
    """Steps that every run logged for ``split``, and each run's ``key`` at those steps."""
    per_run = [{r["step"]: r[key] for r in records if r.get("split") == split} for records in runs]
    steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
    return steps, [[c[s] for s in steps] for c in per_run]


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on a training machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_mean_band(
    ax: Any,
    x: Sequence[float],
    values: Sequence[Sequence[float]],
    *,
    color: str | None,
    label: str,
    marker: str | None,
    band_alpha: float,
) -> bool:
    """The mean over runs as a line and, for several runs, a band from the lowest to the highest
    run; return whether a band was drawn."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    ax.plot(x, arr.mean(0), label=label, color=color, lw=1.6, marker=marker, ms=3)
    if len(arr) > 1:
        ax.fill_between(x, arr.min(0), arr.max(0), color=color, alpha=band_alpha, lw=0)
        return True
    return False


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (temp file + rename) and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def figure_cli(
    description: str,
    draw: Callable[..., Path],
    argv: Sequence[str] | None,
    *,
    dataset: str | None = None,
) -> int:
    """``python -m ... SWEEP_DIR OUT.png [--dataset NAME]``: draw one figure of a sweep."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    if dataset is not None:
        parser.add_argument("--dataset", default=dataset)
    args = parser.parse_args(argv)
    extra = {} if dataset is None else {"dataset": args.dataset}
    print(draw(args.sweep_dir, args.out, **extra))
    return 0


def plot_loss_curves(
    runs_by_norm: Mapping[str, Sequence[Sequence[dict]]], path: Path, title: str
) -> Path:
    """Write a PNG with train and valid loss per norm; ``runs_by_norm[label]`` holds the
    ``metrics.jsonl`` records of each seed."""
    return save_figure(loss_curves_figure(runs_by_norm, title), path)


def loss_curves_figure(runs_by_norm: Mapping[str, Sequence[Sequence[dict]]], title: str) -> Any:
    """The figure of :func:`plot_loss_curves`: both panels share one legend below them, which
    also says what the shaded band is."""
    from matplotlib.patches import Patch

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    banded = False
    for ax, split, name in ((axes[0], "train", "train loss"), (axes[1], "valid", "valid loss")):
        for label, runs in runs_by_norm.items():
            steps, values = curves_at_common_steps(runs, split)
            if not steps:
                continue
            banded |= draw_mean_band(
                ax,
                steps,
                values,
                color=NORM_COLORS.get(label.partition("(")[0]),
                label=f"{display_name(label)} (n={len(runs)})",
                marker="o" if len(steps) <= 12 else None,
                band_alpha=0.15,
            )
        ax.set_xlabel("optimizer updates")
        ax.set_ylabel(name)
        ax.set_title(f"{title}: {name}")
        ax.grid(True, alpha=0.3)
        ax.set_yscale("log")  # late differences between norms are invisible on a linear axis
    # One legend for both panels (a norm may have valid points only), by first appearance.
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if banded:
        entries["shaded band: lowest to highest seed; line: mean over the n seeds"] = Patch(
            color="0.5", alpha=0.3, lw=0
        )
    if entries:
        fig.legend(
            list(entries.values()), list(entries), loc="outside lower center",
            ncols=min(len(entries), 3), fontsize=8, frameon=False,
        )
    return fig
