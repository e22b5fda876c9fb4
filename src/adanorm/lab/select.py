"""Choose AdaNorm's C on the validation set, then report the five norms beside the paper.

The paper reports one AdaNorm number per column, with C a hyper-parameter (docs/paper.md §3.6).
A sweep run with ``--scales 1,2`` holds AdaNorm at every C; this picks, per dataset, the C with
the *best mean validation metric over seeds* (highest or lowest by the task's ``valid_mode``; the
test metric is never looked at), and writes:

* ``<out>/runs/``: the light files of every run (config, provenance, metrics, results; no
  checkpoints), so the numbers can be re-derived;
* ``<out>/adanorm_C_selection.md``: mean validation / test metric per C and the chosen C;
* ``<out>/report.md``, ``report.csv``, ``loss_curves_<dataset>.png``: the lab report
  (:mod:`adanorm.lab.report`) over LayerNorm, LayerNorm-simple, w/o Norm, DetachNorm and AdaNorm
  at the chosen C;
* ``<out>/all_scales/``: the same report with every C as its own row.

Usage: ``python -m adanorm.lab.select SWEEP_DIR OUT_DIR [--require-scales 0.5,1,2,3]`` (any task:
text classification and the converged columns of ``results/converge`` use it).  A choice among
the Cs that happen to have finished is not a choice among the Cs that were meant: with
``--require-scales`` a C without a finished run is an error, and without it a dataset where a
single C has finished is labelled as such (nothing was chosen) in the tables and on stdout.
Likewise a sweep still under way: when a ``sweep.json`` below SWEEP_DIR plans AdaNorm runs that
have not finished and would enter the comparison (a C not yet run, or a seed every C will share),
the C marked is only the best so far, labelled interim; with ``--require-scales`` it is an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .report import collect_runs, label_settings, write_report
from .runs import replicate_of

__all__ = ["choose_scales", "select_and_report"]

LIGHT_FILES = ("config.yaml", "run.json", "results.json", "metrics.jsonl", "train.log")


def _scale(run: dict[str, Any]) -> float | None:
    if run["norm"] != "adanorm":
        return None
    return float((run.get("norm_kwargs") or {}).get("scale", 1.0))


def choose_scales(runs: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per dataset, the AdaNorm C with the best mean validation metric over the replicates (seeds,
    or folds under cross-validation) that *every* C ran, so that a C run at more seeds after the
    choice is still compared on the same replicates as the others; and one summary row per
    (dataset, C), with its mean over all its replicates too.  Ties go to the smaller C."""
    groups: dict[tuple[str, float], dict[int | str, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        scale = _scale(run)
        if scale is not None:
            groups[(run["dataset"], scale)][replicate_of(run)] = run
    common: dict[str, set[int | str]] = {}
    for (dataset, _), members in groups.items():
        common[dataset] = common.get(dataset, set(members)) & set(members)
    for dataset, replicates in common.items():
        if not replicates:
            raise ValueError(
                f"{dataset}: no seed (or fold) ran AdaNorm at every C, so C cannot be chosen on "
                "the same replicates; finish one seed of every C first"
            )
    rows = []
    for (dataset, scale), by_replicate in sorted(groups.items()):
        members = list(by_replicate.values())
        valid_key, test_key = members[0]["valid_metric"], members[0]["test_metric"]
        valid = [float(m["valid"][valid_key]) for m in members]
        test = [float(m["test"][test_key]) for m in members]
        # In a fixed order: fold ids are strings, and a set's order of them varies per process.
        shared = [
            float(by_replicate[r]["valid"][valid_key]) for r in sorted(common[dataset], key=str)
        ]
        rows.append(
            {
                "dataset": dataset,
                "scale": scale,
                "n": len(members),
                "valid_mean": statistics.fmean(valid),
                "valid_std": statistics.stdev(valid) if len(valid) > 1 else None,
                "test_mean": statistics.fmean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else None,
                "n_common": len(shared),
                "valid_common_mean": statistics.fmean(shared),
                "higher_is_better": members[0].get("valid_mode", "max") == "max",
            }
        )
    chosen: dict[str, float] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        candidates = [r for r in rows if r["dataset"] == dataset]
        sign = 1.0 if candidates[0]["higher_is_better"] else -1.0
        best = max(candidates, key=lambda r: (sign * r["valid_common_mean"], -r["scale"]))
        chosen[dataset] = best["scale"]
    for row in rows:
        row["chosen"] = chosen[row["dataset"]] == row["scale"]
    return chosen, rows


def _replicate_text(replicate: int | str) -> str:
    return f"seed {replicate}" if isinstance(replicate, int) else str(replicate)


def _unfinished_adanorm_runs(plan_paths: Sequence[Path]) -> list[tuple[str, float, int | str]]:
    """``(dataset, C, replicate)`` of every AdaNorm run that a sweep plan (``sweep.json``) in
    ``plan_paths`` lists and that has no ``results.json`` yet."""
    # Late imports, as the CLI does: the config machinery is only needed when a plan exists.
    from .config import load_config
    from .runs import replicate_id
    from .sweep import parse_run_path

    unfinished = []
    for plan_path in plan_paths:
        try:
            plan = json.loads(plan_path.read_text())
            task, preset = plan["task"], plan["preset"]
            overrides, listed = list(plan["overrides"]), list(plan["runs"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{plan_path}: not a sweep plan as adanorm sweep writes it ({error!r}); restore "
                "it from git or delete it to compare only the finished runs"
            ) from None
        for relative in listed:
            run_dir = plan_path.parent / relative
            if (run_dir / "results.json").exists():
                continue
            run = parse_run_path(relative)
            if run.norm != "adanorm":
                continue
            config = load_config(task, preset, [*overrides, *run.overrides()])
            scale = float((config["model"].get("norm_kwargs") or {}).get("scale", 1.0))
            fix = f"check the overrides of {plan_path}"
            unfinished.append((run.dataset, scale, replicate_id(config, run.seed, run_dir, fix)))
    return unfinished


def _interim_datasets(
    runs: list[dict[str, Any]], unfinished: list[tuple[str, float, int | str]]
) -> dict[str, str]:
    """Per dataset whose choice the unfinished planned runs could still change, those runs as
    text (``C = 3 (seed 1)``): a C with no finished run yet, or a replicate that every C will
    share once the plan is done, so that it would join the replicates C is chosen over."""
    finished: dict[str, dict[float, set[int | str]]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        scale = _scale(run)
        if scale is not None:
            finished[run["dataset"]][scale].add(replicate_of(run))
    planned: dict[str, dict[float, set[int | str]]] = defaultdict(lambda: defaultdict(set))
    for dataset, scale, replicate in unfinished:
        planned[dataset][scale].add(replicate)
    interim = {}
    for dataset, pending in sorted(planned.items()):
        now = finished.get(dataset)
        if not now:
            continue  # no AdaNorm run finished: nothing is chosen or reported for it
        later = {c: now.get(c, set()) | pending.get(c, set()) for c in set(now) | set(pending)}
        common_now = set.intersection(*now.values())
        common_later = set.intersection(*later.values())
        if set(later) == set(now) and common_later == common_now:
            continue  # e.g. more seeds of the chosen C only: the comparison is already fixed
        parts = []
        for scale in sorted(pending):
            matter = sorted(
                (r for r in pending[scale] if scale not in now or r in common_later), key=str
            )
            if matter:
                parts.append(f"C = {scale:g} ({', '.join(_replicate_text(r) for r in matter)})")
        # Never empty: a new C's runs all matter, and a replicate that joins the common set is
        # pending for some C that already has finished runs.
        interim[dataset] = "; ".join(parts)
    return interim


def _copy_light(run_dir: Path, target: Path) -> None:
    if target.resolve() == run_dir.resolve():
        return  # regenerating the reports from the committed copies: nothing to copy
    target.mkdir(parents=True, exist_ok=True)
    for name in LIGHT_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _scales_text(scales: Sequence[float]) -> str:
    return ", ".join(f"{scale:g}" for scale in sorted(scales))


def _scales_per_dataset(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The Cs with a finished run, per dataset, from :func:`choose_scales`' rows."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        found[row["dataset"]].append(row["scale"])
    return {dataset: sorted(scales) for dataset, scales in found.items()}


def _check_required_scales(
    rows: list[dict[str, Any]], required: Sequence[float], datasets: Sequence[str]
) -> None:
    """Raise ValueError naming every dataset that lacks a finished run at a required C."""
    found = _scales_per_dataset(rows)
    problems = []
    for dataset in sorted(datasets):
        missing = sorted(set(required) - set(found.get(dataset, [])))
        if missing:
            problems.append(f"{dataset} has no finished AdaNorm run at C = {_scales_text(missing)}")
    if problems:
        raise ValueError(
            "; ".join(problems)
            + f" (--require-scales {','.join(f'{c:g}' for c in sorted(required))}): finish one "
            "seed of every C before choosing, or drop --require-scales for an interim table"
        )


def select_and_report(
    sweep_dir: Path, out: Path, required_scales: Sequence[float] | None = None
) -> dict[str, float]:
    """Copy the runs, choose C per dataset on validation, write the reports; return the Cs.

    ``required_scales``: the Cs every dataset must have a finished run at (else ValueError)."""
    return _select(sweep_dir, out, required_scales)[0]


def _select(
    sweep_dir: Path, out: Path, required_scales: Sequence[float] | None
) -> tuple[dict[str, float], set[str], dict[str, str]]:
    """:func:`select_and_report`, also returning the datasets where a single C has finished
    and, per dataset whose choice is interim, the unfinished planned runs that make it so."""
    runs = collect_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs (results.json files) below {sweep_dir}")
    # C is chosen over the seeds of one config per dataset; mixed configs would be pooled.
    label_settings(runs, refuse_mixed=True)
    chosen, rows = choose_scales(runs)
    if required_scales:
        _check_required_scales(rows, required_scales, sorted({run["dataset"] for run in runs}))
    plan_paths = sorted(sweep_dir.rglob("sweep.json"))
    interim = _interim_datasets(runs, _unfinished_adanorm_runs(plan_paths))
    if required_scales and interim:
        raise ValueError(
            "; ".join(
                f"{d} has unfinished planned AdaNorm runs at {text}"
                for d, text in sorted(interim.items())
            )
            + f" (a sweep.json below {sweep_dir}): finish them before choosing with "
            "--require-scales, or drop it for an interim table"
        )
    single = {d for d, scales in _scales_per_dataset(rows).items() if len(scales) == 1}
    out.mkdir(parents=True, exist_ok=True)
    runs_out = out / "runs"
    for run in runs:
        relative = Path(run["run_dir"]).resolve().relative_to(sweep_dir.resolve())
        _copy_light(Path(run["run_dir"]), runs_out / relative)
    # The plans travel with the runs, so the committed copies regenerate the interim labels.
    for plan_path in plan_paths:
        target = runs_out / plan_path.relative_to(sweep_dir)
        if not (target.exists() and target.samefile(plan_path)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(plan_path, target)

    valid_metric, test_metric = runs[0]["valid_metric"], runs[0]["test_metric"]
    best = "highest" if runs[0].get("valid_mode", "max") == "max" else "lowest"
    valid_name = "accuracy" if valid_metric == "acc" else valid_metric
    lines = [
        "# AdaNorm's C, chosen on the validation set",
        "",
        f"Per dataset, the C with the {best} mean validation {valid_name} over the seeds (or "
        "folds) that every C ran (ties: the smaller C); a C run at more seeds afterwards is "
        f"still compared on those. Test {'accuracy' if test_metric == 'acc' else test_metric} is "
        "shown for information only; it played no part in the choice.",
        "",
        f"| dataset | C | seeds | valid {valid_metric} (mean ± std) | test {test_metric} "
        f"(mean ± std) | valid {valid_metric}, seeds every C ran | chosen |",
        "|---|---|---|---|---|---|---|",
    ]

    def mark(row: dict[str, Any]) -> str:
        if not row["chosen"]:
            return ""
        if row["dataset"] in interim:
            return "best so far (interim)"
        return "only C run" if row["dataset"] in single else "**yes**"

    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['scale']:g} | {r['n']} | {_fmt(r['valid_mean'])} ± "
            f"{_fmt(r['valid_std'])} | {_fmt(r['test_mean'])} ± {_fmt(r['test_std'])} | "
            f"{_fmt(r['valid_common_mean'])} (n = {r['n_common']}) | "
            f"{mark(r)} |"
        )
    for dataset in sorted(single):
        lines += [
            "",
            f"**{dataset}: only C = {chosen[dataset]:g} has a finished run, so nothing was "
            "chosen yet**; the report beside this file shows that C as AdaNorm's row, not as a "
            "choice.",
        ]
    for dataset, pending in sorted(interim.items()):
        lines += [
            "",
            f"**{dataset}: interim, not a choice yet**: the sweep plans AdaNorm runs that have "
            f"not finished and would enter the comparison: {pending}. The C marked is the best "
            "so far; the report beside this file shows it as AdaNorm's row.",
        ]
    atomic_write_text(out / "adanorm_C_selection.md", "\n".join(lines) + "\n")

    write_report(runs_out, out / "all_scales")
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            scale = _scale(run)
            if scale is not None and scale != chosen[run["dataset"]]:
                continue
            relative = Path(run["run_dir"]).resolve().relative_to(sweep_dir.resolve())
            _copy_light(Path(run["run_dir"]), Path(tmp) / relative)
        report = write_report(Path(tmp), out)

    def status(dataset: str) -> str:
        if dataset in single:
            return ", the only C with a finished run"
        if dataset in interim:
            return f", interim: {interim[dataset]} not finished"
        return ""

    title = ", ".join(f"{d}: C={c:g}{status(d)}" for d, c in sorted(chosen.items()))
    markdown = report.markdown.replace(
        report.markdown.splitlines()[0],
        f"# Results: the five norms, AdaNorm at the C chosen on validation ({title})",
        1,
    )
    atomic_write_text(out / "report.md", markdown)
    return chosen, single, interim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (adanorm sweep --out)")
    parser.add_argument("out", type=Path, help="where the runs and reports are written")
    parser.add_argument(
        "--require-scales",
        default=None,
        help="comma-separated Cs (e.g. 0.5,1,2,3) that every dataset must have a finished "
        "AdaNorm run at; without it, whichever Cs finished are compared",
    )
    args = parser.parse_args(argv)
    try:
        required = _parse_scales(args.require_scales) if args.require_scales else None
        chosen, single, interim = _select(args.sweep_dir, args.out, required)
    except (ValueError, FileNotFoundError) as error:  # ReportError is a ValueError
        print(f"adanorm.lab.select: error: {error}", file=sys.stderr)
        return 2
    for dataset, scale in sorted(chosen.items()):
        if dataset in single:
            print(f"{dataset}: AdaNorm C = {scale:g}, the only C with a finished run (not chosen)")
        elif dataset in interim:
            print(
                f"{dataset}: AdaNorm C = {scale:g}, best so far (interim: {interim[dataset]} "
                "not finished)"
            )
        else:
            print(f"{dataset}: AdaNorm C = {scale:g} (best mean validation metric)")
    return 0


def _parse_scales(text: str) -> list[float]:
    from .sweep import parse_list  # sweep's --scales parser; imported late, as the CLI does

    try:
        scales = [float(item) for item in parse_list(text, "require-scales")]
    except ValueError:
        raise ValueError(
            f"--require-scales {text!r}: expected comma-separated numbers, e.g. 0.5,1,2,3"
        ) from None
    if any(not scale > 0 for scale in scales):
        raise ValueError(f"--require-scales {text!r}: expected positive Cs, e.g. 0.5,1,2,3")
    return scales


if __name__ == "__main__":
    sys.exit(main())
