"""Tables and plots for a directory of finished runs (any task, any number of datasets).

Every ``results.json`` below the directory is one run.  Runs are grouped by dataset and norm label
(the norm plus its kwargs, e.g. ``adanorm(C=2)``); each group gives mean ± sample std of the
task's test metric over seeds.  Outputs, written atomically into the output directory:

* ``report.md``: the table (one row per norm, one column per dataset, the paper's number beside
  ours), the Δ vs LayerNorm table with a test across seeds, and the plots;
* ``report.csv``: the same numbers, one line per (dataset, norm);
* ``loss_curves_<dataset>.png``: train and valid loss per norm.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .paper_numbers import paper_column, paper_number, paper_table
from .plots import display_name, plot_loss_curves, read_metrics

__all__ = ["Report", "collect_runs", "summarize", "write_report", "compare_to_reference"]

NORM_ORDER = [
    "layernorm",
    "layernorm-simple",
    "none",
    "detachnorm",
    "detach-mean",
    "detach-std",
    "adanorm",
]
REFERENCE = "layernorm"


@dataclass
class Report:
    markdown: str
    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """All finished runs below ``root`` (each ``results.json``, with ``run_dir`` added)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = []
    for path in sorted(root.rglob("results.json")):
        with open(path, encoding="utf-8") as fh:
            result = json.load(fh)
        result["run_dir"] = str(path.parent)
        runs.append(result)
    return runs


def _sort_key(label: str) -> tuple[int, str]:
    base = label.partition("(")[0]
    return (NORM_ORDER.index(base) if base in NORM_ORDER else len(NORM_ORDER), label)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, norm label): mean, std (sample, ddof=1; None for one seed), n."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["norm_label"])].append(run)
    rows = []
    for (dataset, label), members in groups.items():
        metric = members[0]["test_metric"]
        values = [float(m["test"][metric]) for m in members]
        rows.append(
            {
                "dataset": dataset,
                "norm": label,
                "metric": metric,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values),
                "_seeds": {int(m["seed"]): float(m["test"][metric]) for m in members},
                "_norm": members[0]["norm"],
                "_label": members[0].get("test_metric_label", metric),
                "_higher": members[0].get("valid_mode", "max") == "max",
            }
        )
    rows.sort(key=lambda r: (r["dataset"], _sort_key(r["norm"])))
    return rows


def compare_to_reference(
    row: dict[str, Any], ref: dict[str, Any]
) -> tuple[float, float | None, str]:
    """Δ = mean(row) − mean(reference), and a two-sided p-value across seeds: a paired t-test on
    the seeds both have (same seed = same data order), else Welch's t-test."""
    delta = row["mean"] - ref["mean"]
    common = sorted(set(row["_seeds"]) & set(ref["_seeds"]))
    try:
        from scipy import stats
    except ImportError:  # scipy comes with scikit-learn; without it, report Δ only
        return delta, None, "no scipy"
    if len(common) >= 2:
        a = [row["_seeds"][s] for s in common]
        b = [ref["_seeds"][s] for s in common]
        if all(x == y for x, y in zip(a, b, strict=True)):
            return delta, 1.0, "paired t"
        return delta, float(stats.ttest_rel(a, b).pvalue), "paired t"
    a, b = list(row["_seeds"].values()), list(ref["_seeds"].values())
    if len(a) >= 2 and len(b) >= 2:
        return delta, float(stats.ttest_ind(a, b, equal_var=False).pvalue), "Welch t"
    return delta, None, "n < 2"


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _paper(dataset: str, norm: str) -> float | str | None:
    return paper_number(dataset, norm)


def write_report(root: Path, out: Path | None = None) -> Report:
    """Summarize the runs below ``root``; write report.md, report.csv and the loss-curve PNGs."""
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (results.json files) below {root}")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    datasets = sorted({r["dataset"] for r in rows})
    labels = sorted({r["norm"] for r in rows}, key=_sort_key)
    by_key = {(r["dataset"], r["norm"]): r for r in rows}

    # Δ vs LayerNorm, ours and the paper's.
    for row in rows:
        ref = by_key.get((row["dataset"], REFERENCE))
        row["_paper"] = _paper(row["dataset"], row["_norm"])
        if ref is not None and row is not ref:
            row["_delta"], row["_p"], row["_test"] = compare_to_reference(row, ref)
        else:
            row["_delta"], row["_p"], row["_test"] = None, None, ""
        paper_ref = _paper(row["dataset"], REFERENCE)
        if isinstance(row["_paper"], (int, float)) and isinstance(paper_ref, (int, float)):
            row["_paper_delta"] = row["_paper"] - paper_ref
        else:
            row["_paper_delta"] = None

    lines = [f"# Results: {root}", ""]
    metric_notes = sorted({f"{r['dataset']}: test {r['_label']}" for r in rows})
    lines.append(
        f"Metric: {'; '.join(metric_notes)}. Cells: mean ± sample std over n seeds "
        f"(best checkpoint by the validation metric), then the paper's number where the "
        "paper has the dataset."
    )
    lines.append("")
    header = (
        "| Norm | "
        + " | ".join(
            f"{d}"
            + (
                f" (paper: {paper_table()['columns'][paper_column(d)]['label']})"
                if paper_column(d)
                else ""
            )
            for d in datasets
        )
        + " |"
    )
    lines += [header, "|---" * (len(datasets) + 1) + "|"]
    for label in labels:
        cells = []
        for d in datasets:
            r = by_key.get((d, label))
            if r is None:
                cells.append("")
                continue
            ours = f"{r['mean']:.2f} ± {_fmt(r['std'])} (n={r['n']})"
            paper = r["_paper"]
            if paper is not None:
                ours += f" · paper {paper if isinstance(paper, str) else f'{paper:.2f}'}"
            cells.append(ours)
        lines.append(f"| {display_name(label)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Δ vs {display_name(REFERENCE)}",
        "",
        "Ours: Δ of the means, with the two-sided p-value of a t-test across seeds (paired "
        "by seed when both norms ran the same seeds). Paper: the same Δ in the paper's table.",
        "",
        "| Norm | " + " | ".join(datasets) + " |",
        "|---" * (len(datasets) + 1) + "|",
    ]
    for label in labels:
        if label == REFERENCE:
            continue
        cells = []
        for d in datasets:
            r = by_key.get((d, label))
            if r is None or r["_delta"] is None:
                cells.append("—")
                continue
            p = f"p={r['_p']:.3f}, {r['_test']}" if r["_p"] is not None else r["_test"]
            cell = f"{r['_delta']:+.2f} ({p})"
            if r["_paper_delta"] is not None:
                cell += f" · paper {r['_paper_delta']:+.2f}"
            cells.append(cell)
        lines.append(f"| {display_name(label)} | " + " | ".join(cells) + " |")

    files: list[Path] = []
    plot_lines = ["", "## Loss curves", ""]
    for d in datasets:
        runs_by_norm: dict[str, list[list[dict]]] = defaultdict(list)
        for run in runs:
            metrics = Path(run["run_dir"]) / "metrics.jsonl"
            if run["dataset"] == d and metrics.exists():
                runs_by_norm[run["norm_label"]].append(read_metrics(metrics))
        if runs_by_norm:
            ordered = {k: runs_by_norm[k] for k in sorted(runs_by_norm, key=_sort_key)}
            png = plot_loss_curves(ordered, out / f"loss_curves_{d}.png", d)
            files.append(png)
            plot_lines.append(f"![{d} loss curves]({png.name})")
    lines += plot_lines
    markdown = "\n".join(lines) + "\n"

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "dataset",
            "norm",
            "metric",
            "mean",
            "std",
            "n",
            "paper",
            "delta_vs_layernorm",
            "p_value",
            "test",
            "paper_delta_vs_layernorm",
            "per_seed",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r["dataset"],
                r["norm"],
                r["metric"],
                f"{r['mean']:.6g}",
                "" if r["std"] is None else f"{r['std']:.6g}",
                r["n"],
                "" if r["_paper"] is None else r["_paper"],
                "" if r["_delta"] is None else f"{r['_delta']:.6g}",
                "" if r["_p"] is None else f"{r['_p']:.6g}",
                r["_test"],
                "" if r["_paper_delta"] is None else f"{r['_paper_delta']:.6g}",
                ";".join(f"{s}:{v:.6g}" for s, v in sorted(r["_seeds"].items())),
            ]
        )
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.csv", buffer.getvalue())
    files = [out / "report.md", out / "report.csv", *files]
    public = [{k: r[k] for k in ("dataset", "norm", "metric", "mean", "std", "n")} for r in rows]
    return Report(markdown=markdown, rows=public, files=files)
