"""Choose AdaNorm's C on validation for results/mnist_converge, as the authors chose it.

    python results/mnist_converge/choose_c.py RUNS OUT.md

Reads every AdaNorm run below RUNS (its results.json), refuses runs whose configs differ beyond
the seed (the report's rule), and over the seeds that every C ran ranks C by mean validation
accuracy (ties: the smaller C).  Writes OUT.md (every C's row: validation and test, mean ± sample
std, seeds) atomically and prints the chosen C, e.g. ``0.5``.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from adanorm.lab.checkpoint import atomic_write_text
from adanorm.lab.report import ReportError, collect_runs, label_settings
from adanorm.lab.select import choose_scales


def choose(runs_dir: Path, out: Path) -> float:
    runs = collect_runs(runs_dir)
    label_settings(runs, refuse_mixed=True)
    by_scale: dict[float, dict[int, dict]] = defaultdict(dict)
    for run in runs:
        if run["norm"] == "adanorm":
            by_scale[float((run.get("norm_kwargs") or {}).get("scale", 1.0))][run["seed"]] = run
    if not by_scale:
        raise ReportError(f"no AdaNorm runs below {runs_dir}; run stage 1 of run_sweep.sh first")
    common = sorted(set.intersection(*(set(seeds) for seeds in by_scale.values())))
    if not common:
        raise ReportError(f"no seed ran at every C below {runs_dir}; finish a seed first")
    metric, test_metric = runs[0]["valid_metric"], runs[0]["test_metric"]

    def stats(values: list[float]) -> str:
        sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "—"
        return f"{statistics.fmean(values):.3f} ± {sd}"

    rows = []
    for scale in sorted(by_scale):
        valid = [by_scale[scale][s]["valid"][metric] for s in common]
        test = [by_scale[scale][s]["test"][test_metric] for s in common]
        rows.append((scale, stats(valid), stats(test)))
    # The rule itself is the lab's (adanorm.lab.select), so this table and the selection of every
    # other converged column cannot drift apart.
    (chosen,) = choose_scales(runs)[0].values()
    lines = [
        "# AdaNorm's C, chosen on validation (k = 0.1)",
        "",
        f"Seeds every C ran: {', '.join(map(str, common))} (n = {len(common)}). Rule: the C with "
        f"the highest mean validation {metric}; ties go to the smaller C. Test is shown for "
        "every C but plays no part in the choice.",
        "",
        f"| C | valid {metric} (mean ± sd) | test {test_metric} (mean ± sd) | chosen |",
        "|---|---|---|---|",
    ]
    for scale, valid_text, test_text in rows:
        mark = "**yes**" if scale == chosen else ""
        lines.append(f"| {scale:g} | {valid_text} | {test_text} | {mark} |")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return chosen


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: choose_c.py RUNS OUT.md", file=sys.stderr)
        return 2
    try:
        print(f"{choose(Path(argv[0]), Path(argv[1])):g}")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
