"""Do the gain and bias over-fit?  LayerNorm vs LayerNorm-simple: the train-minus-valid gap.

    python results/converge/gap.py OUT.md COLUMN_RUNS_DIR [COLUMN_RUNS_DIR ...]

For every run below each directory, at its best checkpoint (``results.json``'s ``best_step``,
the one the test number comes from):

* ``train``: the mean of the training log lines (each a mean over ``train.log_every`` updates,
  dropout on) in the evaluation interval that ends at the best step;
* ``valid``: the validation number logged at the best step;
* the gap: train accuracy minus valid accuracy (percentage points), and valid loss minus train
  loss.  A larger gap is more over-fitting.

Per column: mean ± sample std of each norm's gap, and Δ (LayerNorm-simple minus LayerNorm) with
its 95 % interval and the paired test of :func:`adanorm.lab.report.compare`; Holm's correction
runs over the columns' comparisons; the verdict rule is the report's (lower gap is better).

A second table tests the paper's figures 2 and 3 ("AdaNorm generalizes better": a higher train
loss and a lower validation loss than LayerNorm) on the same runs: AdaNorm at the C chosen on
validation (:func:`adanorm.lab.select.choose_scales`, as in the column's report) minus LayerNorm,
in train loss, valid loss and the loss gap, each scored in the paper's direction, with its own
Holm correction.  Written atomically to OUT.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from adanorm.lab.chance import check_chance
from adanorm.lab.checkpoint import atomic_write_text
from adanorm.lab.report import collect_runs, compare, holm, label_settings, verdict
from adanorm.lab.runs import replicate_of
from adanorm.lab.select import choose_scales

NORMS = ("layernorm", "layernorm-simple")
# Accuracies logged on both splits: the classifiers' ``acc``; the parser's ``transition_acc`` (its
# UAS is measured on validation only, so its train-minus-valid gap is taken on transitions).
ACCURACY_KEYS = ("acc", "transition_acc")


def gap_of(run: dict) -> dict[str, float]:
    """The train-minus-valid gaps of one run at its best step, and its two losses there."""
    text = (Path(run["run_dir"]) / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    best = int(run["best_step"])
    valid = next(r for r in lines if r.get("split") == "valid" and r["step"] == best)
    earlier = [r["step"] for r in lines if r.get("split") == "valid" and r["step"] < best]
    start = max(earlier, default=0)
    train = [r for r in lines if r.get("split") == "train" and start < r["step"] <= best]
    if not train:
        raise SystemExit(f"{run['run_dir']}: no training log line in ({start}, {best}]")
    train_loss = statistics.fmean(r["loss"] for r in train)
    out = {
        "loss": valid["loss"] - train_loss,
        "train_loss": train_loss,
        "valid_loss": valid["loss"],
    }
    for key in ACCURACY_KEYS:
        if key in valid and all(key in r for r in train):
            out[key] = statistics.fmean(r[key] for r in train) - valid[key]
    return out


def _ms(values: list[float]) -> str:
    sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "—"
    return f"{statistics.fmean(values):.3f} ± {sd}"


def _gaps_by_replicate(runs: list[dict], root: Path) -> dict[int | str, dict[str, float]]:
    by_replicate: dict[int | str, dict[str, float]] = {}
    for run in runs:
        replicate = replicate_of(run)
        if replicate in by_replicate:
            raise SystemExit(
                f"{run['run_dir']}: a second {run['norm']} run of replicate {replicate} in "
                f"{root}; keep one run per seed (or fold)"
            )
        by_replicate[replicate] = gap_of(run)
    return by_replicate


def _score(rows: list[dict]) -> None:
    """Holm over ``rows``; each row's ``higher_is_better`` orients its verdict."""
    for row, p_holm in zip(rows, holm([r["result"].p for r in rows]), strict=True):
        row["p_holm"] = p_holm
        row["verdict"] = verdict(row["result"].delta, p_holm, row["higher_is_better"])


def _chance_flag(runs: list[dict], chance: dict) -> str:
    """What the verdict cell says about runs of the row that never beat their data's chance
    level (:mod:`adanorm.lab.chance`), or could not be checked."""
    checks = [chance[run["run_dir"]] for run in runs]
    at_chance = sum(check.at_chance for check in checks)
    unchecked = sum(check.level is None for check in checks)
    flag = f" ⚠ {at_chance} at chance" if at_chance else ""
    return flag + (f" ({unchecked} runs not checked for chance)" if unchecked else "")


def _stat_cells(row: dict) -> str:
    r = row["result"]
    ci = "—" if r.low is None else f"[{r.low:+.3f}, {r.high:+.3f}]"
    p = "—" if r.p is None else f"{r.p:.3g}"
    ph = "—" if row["p_holm"] is None else f"{row['p_holm']:.3g}"
    return f"{r.delta:+.3f} | {ci} | {r.test} ({r.n}) | {p} | {ph} | {row['verdict']}{row['flag']}"


# The paper's figures 2-3, as (kind, what AdaNorm does to it there, higher_is_better for AdaNorm).
ADANORM_PATTERN = (
    ("train_loss", "higher", True),
    ("valid_loss", "lower", False),
    ("loss", "smaller", False),
)
KIND_NAMES = {"train_loss": "train loss", "valid_loss": "valid loss", "loss": "loss gap"}


def main(out: Path, roots: list[Path]) -> None:
    comparisons: list[dict] = []
    adanorm_rows: list[dict] = []
    for root in roots:
        all_runs = collect_runs(root)
        chance = {check.run_dir: check for check in check_chance(all_runs)}
        runs = [r for r in all_runs if r["norm"] in NORMS]
        for dataset in sorted({r["dataset"] for r in all_runs}):
            column = [r for r in all_runs if r["dataset"] == dataset]
            label_settings(column, refuse_mixed=True)
            by_norm = {
                n: _gaps_by_replicate(
                    [r for r in runs if r["dataset"] == dataset and r["norm"] == n], root
                )
                for n in NORMS
            }
            gaps = [g for n in NORMS for g in by_norm[n].values()]
            kinds = [k for k in (*ACCURACY_KEYS, "loss") if all(k in g for g in gaps)]
            for kind in kinds:
                per = {n: {k: g[kind] for k, g in by_norm[n].items()} for n in NORMS}
                if not all(per[n] for n in NORMS):
                    continue
                comparisons.append(
                    {
                        "column": f"{root} ({dataset})",
                        "kind": kind,
                        "per": per,
                        "result": compare(per["layernorm-simple"], per["layernorm"]),
                        # A smaller gap is better: score it as a lower-is-better metric.
                        "higher_is_better": False,
                        "flag": _chance_flag(
                            [r for r in runs if r["dataset"] == dataset], chance
                        ),
                    }
                )
            adanorm_runs = [r for r in column if r["norm"] == "adanorm"]
            if not adanorm_runs or not by_norm["layernorm"]:
                continue
            chosen = choose_scales(adanorm_runs)[0][dataset]
            at_chosen = [
                r
                for r in adanorm_runs
                if float((r.get("norm_kwargs") or {}).get("scale", 1.0)) == chosen
            ]
            ada = _gaps_by_replicate(at_chosen, root)
            for kind, direction, higher in ADANORM_PATTERN:
                per = {
                    "layernorm": {k: g[kind] for k, g in by_norm["layernorm"].items()},
                    "adanorm": {k: g[kind] for k, g in ada.items()},
                }
                adanorm_rows.append(
                    {
                        "column": f"{root} ({dataset})",
                        "C": chosen,
                        "kind": kind,
                        "direction": direction,
                        "per": per,
                        "result": compare(per["adanorm"], per["layernorm"]),
                        "higher_is_better": higher,
                        "flag": _chance_flag(
                            at_chosen
                            + [r for r in runs if r["dataset"] == dataset
                               and r["norm"] == "layernorm"],
                            chance,
                        ),
                    }
                )
    _score(comparisons)
    _score(adanorm_rows)
    lines = [
        "# Gain and bias over-fitting: the train-minus-valid gap at the best checkpoint",
        "",
        f"Generated by `python results/converge/gap.py {out} {' '.join(map(str, roots))}`.",
        "",
        "Gap: train accuracy − valid accuracy (points; `transition_acc` is the parser's share of "
        "gold transitions predicted, the one accuracy it logs on both splits) or valid loss − "
        "train loss, where train is "
        "the mean of the training log lines (dropout on) in the evaluation interval ending at "
        "the best step and valid is the validation number at that step. Δ = LayerNorm-simple − "
        "LayerNorm (paired over seeds or folds; 95 % t interval); Holm over the rows below. "
        "Verdict for LayerNorm-simple: win = a significantly smaller gap (less over-fitting than "
        "LayerNorm with gain and bias), loss = larger, tie = not told apart. ⚠ n at chance: n "
        "of the row's runs never beat their data's chance level (`adanorm report`'s check, "
        "`docs/lab.md`); they are kept, as in the reports.",
        "",
        "| Column | Gap in | LayerNorm | LayerNorm-simple | Δ | 95 % CI | test (n) | p | Holm p "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in comparisons:
        lines.append(
            f"| {row['column']} | {row['kind']} | {_ms(list(row['per']['layernorm'].values()))} "
            f"| {_ms(list(row['per']['layernorm-simple'].values()))} | {_stat_cells(row)} |"
        )
    lines += [
        "",
        "## Does AdaNorm generalize better? (the paper's figures 2 and 3)",
        "",
        "The paper's curves show AdaNorm with a higher train loss and a lower validation loss "
        "than LayerNorm. Here, at the best checkpoint of the same runs: AdaNorm at the C chosen "
        "on validation (as in the column's report) minus LayerNorm, in train loss (as above), "
        "valid loss, and the loss gap (valid − train). Each row is scored in the paper's "
        "direction: win = significantly higher train loss, lower valid loss or smaller gap; loss "
        "= significantly the other way; tie = not told apart. Holm over the rows of this table.",
        "",
        "| Column | C | Quantity | paper: AdaNorm's is | LayerNorm | AdaNorm | Δ | 95 % CI "
        "| test (n) | p | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in adanorm_rows:
        lines.append(
            f"| {row['column']} | {row['C']:g} | {KIND_NAMES[row['kind']]} | {row['direction']} "
            f"| {_ms(list(row['per']['layernorm'].values()))} "
            f"| {_ms(list(row['per']['adanorm'].values()))} | {_stat_cells(row)} |"
        )
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
