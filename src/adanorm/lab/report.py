"""Tables and plots for a directory of finished runs (any task, any number of datasets).

Every ``results.json`` below the directory is one run.  Runs are pooled over seeds only when they
ran the same experiment: the same dataset, the same norm label (the norm plus its kwargs, e.g.
``adanorm(C=2)``) and the same ``config.yaml`` apart from the seed and the keys in
:data:`IGNORED_KEYS`.  Runs of one dataset whose configs differ in anything else get one column per
config, labelled by the keys that differ (``tiny_shakespeare [train.max_steps=1000]``), or, with
``refuse_mixed=True``, an error that names the keys.  Two runs of the same experiment and seed are
an error that names both run directories.

Each column gives, per norm, mean ± sample std of the task's test metric over seeds.  Outputs,
written atomically into the output directory:

* ``report.md``: the table (one row per norm, one column per dataset and config, the paper's number
  beside ours), the Δ vs LayerNorm table with a test across seeds (within a column only), and the
  plots;
* ``report.csv``: the same numbers, one line per (dataset, config, norm);
* ``loss_curves_<dataset>.png`` (``loss_curves_<dataset>_<i>.png`` when a dataset has several
  configs): train and valid loss per norm.

A missing directory, a run without ``config.yaml`` and a malformed ``results.json``,
``config.yaml``, ``run.json`` or ``metrics.jsonl`` raise :class:`ReportError` with one line that
names the file.
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

from .chance import CHANCE_RULE, check_chance
from .checkpoint import atomic_write_text
from .paper_numbers import paper_column, paper_number, paper_table
from .plots import display_name, plot_loss_curves
from .runs import (
    IGNORED_KEYS,
    NoRunsError,
    ReportError,
    canonical_value,
    collect_runs,
    config_identity,
    is_number,
    label_settings,
    read_metrics_checked,
    replicate_of,
)
from .seedstats import (
    VERDICT_RULE,
    Comparison,
    compare,
    compare_to_reference,
    holm,
    verdict,
)

__all__ = [
    "IGNORED_KEYS",
    "NoRunsError",
    "Report",
    "ReportError",
    "Comparison",
    "collect_runs",
    "compare",
    "compare_to_reference",
    "holm",
    "verdict",
    "config_identity",
    "label_settings",
    "summarize",
    "write_report",
]

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

# The paper's claims that a table of norms can score, as (claim, the norm claimed better, the
# other norm): Table 1 (AdaNorm), Table 1's gain-and-bias finding, Table 2 (the derivatives of the
# mean and variance matter).
CLAIMS = (
    ("AdaNorm beats LayerNorm (Table 1)", "adanorm", "layernorm"),
    ("LayerNorm-simple matches or beats LayerNorm (Table 1)", "layernorm-simple", "layernorm"),
    ("LayerNorm-simple beats DetachNorm (Table 2)", "layernorm-simple", "detachnorm"),
)


@dataclass
class Report:
    markdown: str
    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    #: One line per run at chance level, and one per column that could not be checked (why).
    at_chance: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


def _sort_key(label: str) -> tuple[int, str]:
    base = label.partition("(")[0]
    return (NORM_ORDER.index(base) if base in NORM_ORDER else len(NORM_ORDER), label)


# Whether a higher test metric is better, for test metrics that differ from the validation
# metric (MT selects on valid loss but reports BLEU); a test metric equal to the validation
# metric takes the run's valid_mode.
TEST_METRIC_HIGHER_IS_BETTER = {
    "acc": True,
    "bleu": True,
    "sacrebleu": True,
    "uas": True,
    "uas_excl_punct": True,
    "las": True,
    "loss": False,
    "bpc": False,
    "ppl": False,
}


def higher_is_better(result: dict[str, Any]) -> bool:
    """Whether a higher ``test.<test_metric>`` is better for this run's results."""
    metric = result["test_metric"]
    if metric == result.get("valid_metric") and result.get("valid_mode") in ("max", "min"):
        return result["valid_mode"] == "max"
    if metric in TEST_METRIC_HIGHER_IS_BETTER:
        return TEST_METRIC_HIGHER_IS_BETTER[metric]
    raise ReportError(
        f"{result['run_dir']}: cannot tell whether a higher test metric {metric!r} is better; "
        "add it to adanorm.lab.report.TEST_METRIC_HIGHER_IS_BETTER"
    )


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, setting, norm label): mean, std (sample, ddof=1; None for one seed),
    n.  Runs without a ``setting`` (see :func:`label_settings`) count as setting "".  Two runs of
    the same row and seed are a :class:`ReportError` naming both run directories."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run.get("setting", ""), run["norm_label"])].append(run)
    rows = []
    for (dataset, setting, label), members in groups.items():
        norms = {
            json.dumps([m["norm"], canonical_value(m.get("norm_kwargs") or {})]) for m in members
        }
        if len(norms) > 1:
            several = "; ".join(sorted(norms))
            raise ReportError(
                f"the label {label} of {dataset} stands for several norms ({several}), e.g. in "
                f"{members[0]['run_dir']}; give them kwargs that print differently"
            )
        by_seed: dict[int | str, dict[str, Any]] = {}
        for member in members:
            seed = replicate_of(member)
            if seed in by_seed:
                raise ReportError(
                    f"seed {seed} of {dataset} {label} ran twice with the same config: "
                    f"{by_seed[seed]['run_dir']} and {member['run_dir']}; move one of them out "
                    "of the report's directory"
                )
            by_seed[seed] = member
        metric = members[0]["test_metric"]
        values = [float(m["test"][metric]) for m in members]
        rows.append(
            {
                "dataset": dataset,
                "setting": setting,
                "norm": label,
                "metric": metric,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values),
                "_seeds": {replicate_of(m): float(m["test"][metric]) for m in members},
                "_run_dirs": [m["run_dir"] for m in members],
                "_norm": members[0]["norm"],
                "_label": members[0].get("test_metric_label", metric),
                "_higher": higher_is_better(members[0]),
            }
        )
    rows.sort(key=lambda r: (r["dataset"], r["setting"], _sort_key(r["norm"])))
    return rows


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _paper(dataset: str, norm: str) -> float | str | None:
    return paper_number(dataset, norm)


def _column_title(dataset: str, setting: str) -> str:
    return f"{dataset} [{setting}]" if setting else dataset


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _digits(entry: dict[str, Any]) -> int:
    # BPC and losses are around 1-5 and differ in the third decimal; accuracies in the second.
    return 2 if abs(entry["ref"]["mean"]) >= 10 else 3


def _comparison_line(
    column: str, title: str, entry: dict[str, Any], paper_delta: float | None
) -> str:
    result: Comparison = entry["result"]
    digits = _digits(entry)
    ci = (
        "—"
        if result.low is None
        else f"[{_fmt(result.low, digits, sign=True)}, {_fmt(result.high, digits, sign=True)}]"
    )
    p = "—" if result.p is None else f"{result.p:.3f}"
    p_holm = "—" if entry["p_holm"] is None else f"{entry['p_holm']:.3f}"
    paper = "—" if paper_delta is None else f"{paper_delta:+.2f}"
    # A comparison that averages in a run which learned nothing says so where it is read.
    at_chance = (entry["row"]["_at_chance"] or 0) + (entry["ref"]["_at_chance"] or 0)
    flag = f" ⚠ {at_chance} at chance" if at_chance else ""
    return (
        f"| {column} | {title} | {_fmt(result.delta, digits, sign=True)} | {ci} | "
        f"{result.test} ({result.n}) | {p} | {p_holm} | {entry['verdict']}{flag} | {paper} |"
    )


def write_report(
    root: Path,
    out: Path | None = None,
    *,
    refuse_mixed: bool = False,
    data_dir: str | None = None,
) -> Report:
    """Summarize the runs below ``root``; write report.md, report.csv and the loss-curve PNGs.

    Runs of a dataset whose configs differ beyond the seed and :data:`IGNORED_KEYS` get one
    column per config (labelled by the differing keys), or a :class:`ReportError` with
    ``refuse_mixed``.  Every run's best validation metric is checked against its data's chance
    level (:mod:`adanorm.lab.chance`, read from ``data_dir``, else ``$ADANORM_DATA``): runs at
    chance are marked in the table and listed, and columns that could not be checked say why."""
    runs = collect_runs(root)
    if not runs:
        raise NoRunsError(
            f"no finished runs (results.json files) below {root}; give the directory that holds "
            "the runs"
        )
    label_settings(runs, refuse_mixed=refuse_mixed)
    rows = summarize(runs)
    # Metrics files are read (and checked) before anything is written, so a bad file leaves the
    # previous report untouched.
    metrics_by_run: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        metrics = Path(run["run_dir"]) / "metrics.jsonl"
        if metrics.exists():
            fix = f"re-run that run, or move {metrics.parent} out of {root}"
            metrics_by_run[run["run_dir"]] = read_metrics_checked(metrics, fix)
    chance = {check.run_dir: check for check in check_chance(runs, data_dir)}
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    columns = sorted({(r["dataset"], r["setting"]) for r in rows})
    for row in rows:
        checks = [chance[run_dir] for run_dir in row["_run_dirs"]]
        # None (unknown) unless every run of the row was checked: a partial count would read as
        # "none at chance".
        row["_at_chance"] = (
            sum(check.at_chance for check in checks)
            if all(check.level is not None for check in checks)
            else None
        )
    labels = sorted({r["norm"] for r in rows}, key=_sort_key)
    by_key = {(r["dataset"], r["setting"], r["norm"]): r for r in rows}

    # Δ vs LayerNorm of the same column (same dataset and config), ours and the paper's, then
    # the paper's claims that are not against LayerNorm; Holm runs over all of them at once.
    comparisons: list[dict[str, Any]] = []
    for row in rows:
        ref = by_key.get((row["dataset"], row["setting"], REFERENCE))
        row["_paper"] = _paper(row["dataset"], row["_norm"])
        row["_cmp"] = None
        if ref is not None and row is not ref:
            row["_cmp"] = {"row": row, "ref": ref, "result": compare(row["_seeds"], ref["_seeds"])}
            comparisons.append(row["_cmp"])
        paper_ref = _paper(row["dataset"], REFERENCE)
        if isinstance(row["_paper"], (int, float)) and isinstance(paper_ref, (int, float)):
            row["_paper_delta"] = row["_paper"] - paper_ref
        else:
            row["_paper_delta"] = None
    claim_rows: list[tuple[str, dict[str, Any]]] = []
    for d, s in columns:
        for claim, better, worse in CLAIMS:
            pairs = [
                (r, by_key.get((d, s, worse)))
                for r in rows
                if (r["dataset"], r["setting"]) == (d, s) and r["_norm"] == better
            ]
            for high, low in pairs:
                if low is None:
                    continue
                if worse == REFERENCE:
                    entry = high["_cmp"]
                else:
                    entry = {
                        "row": high,
                        "ref": low,
                        "result": compare(high["_seeds"], low["_seeds"]),
                    }
                    comparisons.append(entry)
                claim_rows.append((claim, entry))
    for entry, p_holm in zip(comparisons, holm([c["result"].p for c in comparisons]), strict=True):
        entry["p_holm"] = p_holm
        entry["verdict"] = verdict(entry["result"].delta, p_holm, entry["row"]["_higher"])

    lines = [f"# Results: {root}", ""]
    metric_notes = sorted({f"{r['dataset']}: test {r['_label']}" for r in rows})
    lines.append(
        f"Metric: {'; '.join(metric_notes)}. Cells: mean ± sample std over n seeds "
        f"(best checkpoint by the validation metric), then the paper's number where the "
        "paper has the dataset."
    )
    if any(setting for _, setting in columns):
        lines += [
            "",
            "Runs are pooled only over seeds of the same config. Where a dataset's runs differ "
            "in other config keys, each config is its own column, labelled `dataset [key=value, "
            "...]` with the keys that differ; Δ vs LayerNorm compares within a column only.",
        ]
    lines.append("")
    header = (
        "| Norm | "
        + " | ".join(
            _column_title(d, s)
            + (
                f" (paper: {paper_table()['columns'][paper_column(d)]['label']})"
                if paper_column(d)
                else ""
            )
            for d, s in columns
        )
        + " |"
    )
    lines += [header, "|---" * (len(columns) + 1) + "|"]
    for label in labels:
        cells = []
        for d, s in columns:
            r = by_key.get((d, s, label))
            if r is None:
                cells.append("")
                continue
            ours = f"{r['mean']:.2f} ± {_fmt(r['std'])} (n={r['n']})"
            if r["_at_chance"]:
                ours += f" ⚠ {r['_at_chance']} at chance"
            paper = r["_paper"]
            if paper is not None:
                ours += f" · paper {paper if isinstance(paper, str) else f'{paper:.2f}'}"
            cells.append(ours)
        lines.append(f"| {display_name(label)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Convergence",
        "",
        "Runs whose best validation step is before their last step (validation had stopped "
        "improving), and runs ended by early stopping (train.patience), per column.",
        "",
        "| Column | runs | best step before the last | stopped early |",
        "|---|---|---|---|",
    ]
    for d, s in columns:
        members = [run for run in runs if (run["dataset"], run["setting"]) == (d, s)]
        known = [run for run in members if is_number(run.get("best_step"))]
        before = sum(run["best_step"] < run.get("steps", run["best_step"]) for run in known)
        early = sum(run.get("stopped_early") is True for run in members)
        unknown = (
            f" ({len(members) - len(known)} without best_step)" if len(known) < len(members) else ""
        )
        lines.append(f"| {_column_title(d, s)} | {len(members)} | {before}{unknown} | {early} |")
    at_chance_lines, unchecked_lines = [], []
    lines += [
        "",
        "## Chance level",
        "",
        CHANCE_RULE,
        "",
        "| Column | chance level (valid metric) | predictor | runs at chance |",
        "|---|---|---|---|",
    ]
    for d, s in columns:
        title = _column_title(d, s)
        members = [run for run in runs if (run["dataset"], run["setting"]) == (d, s)]
        checks = [chance[run["run_dir"]] for run in members]
        reasons = sorted({check.reason for check in checks if check.level is None})
        for reason in reasons:
            unchecked_lines.append(f"{title}: not checked: {reason}")
        levels = sorted({(c.level.metric, c.level.value, c.level.predictor)
                         for c in checks if c.level is not None})
        flagged = [
            (run, check) for run, check in zip(members, checks, strict=True) if check.at_chance
        ]
        for run, check in flagged:
            at_chance_lines.append(
                f"{run['run_dir']}: best valid {run['valid_metric']} {check.valid:.5g}, chance "
                f"level {check.level.value:.5g} ({check.level.predictor})"
            )
        listed = "; ".join(
            f"{display_name(run['norm_label'])} seed {replicate_of(run)} "
            f"({check.valid:.5g})"
            for run, check in sorted(flagged, key=lambda f: (_sort_key(f[0]["norm_label"]),
                                                              str(replicate_of(f[0]))))
        )
        checked = len(members) - sum(check.level is None for check in checks)
        verdict_cell = f"{len(flagged)} of {checked}" + (f": {listed}" if listed else "")
        if reasons:
            verdict_cell += f" ({len(members) - checked} not checked: {'; '.join(reasons)})"
        # Under cross-validation each fold has its own train split, hence its own chance level.
        values = sorted({value for _, value, _ in levels})
        metrics = sorted({metric for metric, _, _ in levels})
        level_cell = (
            "—"
            if not levels
            else f"{'/'.join(metrics)} {values[0]:.5g}"
            if len(values) == 1
            else f"{'/'.join(metrics)} {values[0]:.5g} to {values[-1]:.5g} (per data split)"
        )
        predictor_cell = "; ".join(sorted({p for _, _, p in levels})) or "—"
        lines.append(f"| {title} | {level_cell} | {predictor_cell} | {verdict_cell} |")
    lines += [
        "",
        f"## Δ vs {display_name(REFERENCE)}",
        "",
        "Δ: the norm minus LayerNorm in the column's metric. With 2 or more seeds in common, Δ is "
        "the mean of the per-seed differences over those seeds (a paired t-test and its 95 % t "
        "interval; n = pairs), else the difference of the means (Welch's t-test and interval; "
        "n = the norm's seeds). p: two-sided; Holm p: corrected over all "
        f"{sum(c['p_holm'] is not None for c in comparisons)} tests of this report. Paper: the "
        "same Δ in the paper's table.",
        "",
        VERDICT_RULE,
        "",
        "| Column | Norm | Δ | 95 % CI | test (n) | p | Holm p | verdict | paper Δ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d, s in columns:
        for label in labels:
            r = by_key.get((d, s, label))
            if r is None or r["_cmp"] is None:
                continue
            lines.append(
                _comparison_line(
                    _column_title(d, s), display_name(label), r["_cmp"], r["_paper_delta"]
                )
            )
    lines += [
        "",
        "## The paper's claims",
        "",
        "Each claim compares the norm it says is better with the other one (Δ = better − other, "
        "same statistics and rule as above): **win** supports the claim, **loss** contradicts "
        "it, **tie** means our seeds cannot tell the two apart. The paper's claims: "
        + "; ".join(f"{claim}" for claim, _, _ in CLAIMS)
        + ".",
        "",
        "| Column | Claim | Δ | 95 % CI | test (n) | p | Holm p | verdict | paper Δ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _claim, entry in claim_rows:
        high, low = entry["row"], entry["ref"]
        paper_high, paper_low = high["_paper"], low["_paper"]
        paper_delta = (
            paper_high - paper_low
            if isinstance(paper_high, (int, float)) and isinstance(paper_low, (int, float))
            else None
        )
        title = f"{display_name(high['norm'])} vs {display_name(low['norm'])}"
        lines.append(
            _comparison_line(
                _column_title(high["dataset"], high["setting"]), title, entry, paper_delta
            )
        )
    if not claim_rows:
        lines.append("| — | no column has the norms of a claim | | | | | | | |")

    files: list[Path] = []
    plot_lines = ["", "## Loss curves", ""]
    for d in sorted({d for d, _ in columns}):
        settings = [s for dataset, s in columns if dataset == d]
        for index, s in enumerate(settings, start=1):
            runs_by_norm: dict[str, list[list[dict]]] = defaultdict(list)
            for run in runs:
                if run["dataset"] == d and run["setting"] == s and run["run_dir"] in metrics_by_run:
                    runs_by_norm[run["norm_label"]].append(metrics_by_run[run["run_dir"]])
            if not runs_by_norm:
                continue
            ordered = {k: runs_by_norm[k] for k in sorted(runs_by_norm, key=_sort_key)}
            name = f"loss_curves_{d}.png" if len(settings) == 1 else f"loss_curves_{d}_{index}.png"
            png = plot_loss_curves(ordered, out / name, _column_title(d, s))
            files.append(png)
            plot_lines.append(f"![{_column_title(d, s)} loss curves]({png.name})")
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
            "setting",
            "ci95_low",
            "ci95_high",
            "n_compared",
            "p_holm",
            "verdict",
            "runs_at_chance",
        ]
    )
    for r in rows:
        cmp_result = r["_cmp"]["result"] if r["_cmp"] else None
        writer.writerow(
            [
                r["dataset"],
                r["norm"],
                r["metric"],
                f"{r['mean']:.6g}",
                "" if r["std"] is None else f"{r['std']:.6g}",
                r["n"],
                "" if r["_paper"] is None else r["_paper"],
                _g(cmp_result.delta if cmp_result else None),
                _g(cmp_result.p if cmp_result else None),
                cmp_result.test if cmp_result else "",
                "" if r["_paper_delta"] is None else f"{r['_paper_delta']:.6g}",
                ";".join(f"{s}:{v:.6g}" for s, v in sorted(r["_seeds"].items())),
                r["setting"],
                _g(cmp_result.low if cmp_result else None),
                _g(cmp_result.high if cmp_result else None),
                cmp_result.n if cmp_result else "",
                _g(r["_cmp"]["p_holm"] if cmp_result else None),
                r["_cmp"]["verdict"] if cmp_result else "",
                "" if r["_at_chance"] is None else r["_at_chance"],
            ]
        )
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.csv", buffer.getvalue())
    files = [out / "report.md", out / "report.csv", *files]
    public = [
        {
            **{k: r[k] for k in ("dataset", "setting", "norm", "metric", "mean", "std", "n")},
            "runs_at_chance": r["_at_chance"],
        }
        for r in rows
    ]
    return Report(
        markdown=markdown,
        rows=public,
        files=files,
        at_chance=at_chance_lines,
        unchecked=unchecked_lines,
    )
