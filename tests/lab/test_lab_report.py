"""Reports (tables, Δ vs LayerNorm with a test across seeds, plots), sweeps, the demo and the
bundled paper numbers."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from lab_helpers import REPO

from adanorm.lab.paper_numbers import paper_number, paper_table
from adanorm.lab.report import (
    ReportError,
    collect_runs,
    compare,
    holm,
    label_settings,
    summarize,
    verdict,
    write_report,
)
from adanorm.lab.runinfo import norm_label
from adanorm.lab.sweep import plan_sweep, run_sweep

ACCS = {  # dataset -> norm -> per-seed test accuracy
    "mnist": {
        "layernorm": [99.0, 99.2, 99.1],
        "adanorm": [99.3, 99.5, 99.4],
        "none": [98.0, 99.0, 98.5],
    },
    "sst5": {"layernorm": [40.0, 41.0]},
}


_ABSENT = object()  # a config value meaning: leave the key out of config.yaml


def _fake_run(
    root: Path,
    dataset: str,
    norm: str,
    seed: int,
    acc: float,
    *,
    name: str | None = None,
    config: dict | None = None,
    device: str | None = "cpu",
    norm_kwargs: dict | None = None,
    valid: float | None = None,
) -> Path:
    """A finished run as the trainer writes it: results.json, config.yaml, run.json and
    metrics.jsonl; ``config`` holds dotted keys that override the base config."""
    run = root / dataset / (name or norm) / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": "x",
                "dataset": dataset,
                "norm": norm,
                "norm_kwargs": norm_kwargs or {},
                "norm_label": norm_label(norm, norm_kwargs),
                "seed": seed,
                "valid_metric": "acc",
                "valid_mode": "max",
                "test_metric": "acc",
                "test_metric_label": "accuracy (%)",
                "valid": {"acc": acc if valid is None else valid},
                "test": {"acc": acc},
            }
        )
    )
    cfg: dict = {
        "task": "x",
        "seed": seed,
        "data": {"name": dataset, "batch_size": 32},
        "model": {"norm": norm, "norm_kwargs": norm_kwargs or {}},
        "train": {"max_steps": 20, "eval_every": 10, "threads": 1, "average_checkpoints": 0},
    }
    for dotted, value in (config or {}).items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        if value is _ABSENT:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if device is not None:
        (run / "run.json").write_text(json.dumps({"environment": {"device": device}}))
    lines = [
        {"split": s, "step": k, "loss": 1.0 / (k + seed)}
        for k in (10, 20)
        for s in ("train", "valid")
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    for dataset, norms in ACCS.items():
        for norm, values in norms.items():
            for seed, acc in enumerate(values, start=1):
                _fake_run(tmp_path, dataset, norm, seed, acc)
    return tmp_path


def test_report_rows_tables_and_plots(fake_sweep: Path) -> None:
    report = write_report(fake_sweep)
    rows = {(r["dataset"], r["norm"]): r for r in report.rows}
    assert set(report.rows[0]) == {
        "dataset",
        "setting",
        "norm",
        "metric",
        "mean",
        "std",
        "n",
        "runs_at_chance",
    }
    assert {r["setting"] for r in report.rows} == {""}  # one config per dataset: no labels
    assert rows[("mnist", "adanorm")]["mean"] == pytest.approx(99.4)
    assert rows[("mnist", "adanorm")]["std"] == pytest.approx(0.1)
    assert rows[("mnist", "none")]["std"] == pytest.approx(0.5)
    assert rows[("sst5", "layernorm")]["n"] == 2
    md = (fake_sweep / "report.md").read_text()
    assert "| LayerNorm |" in md and "| AdaNorm |" in md
    assert "paper 99.35" in md and "paper 39.23" in md  # the paper's numbers side by side
    # AdaNorm - LayerNorm = +0.30 in every seed: paired differences are constant, so the paired
    # t-test's p is 0 and the interval is the point — the test across seeds must see seed pairing.
    assert (
        "| mnist | AdaNorm | +0.30 | [+0.30, +0.30] | paired t (3) | 0.000 | 0.000 | win | +0.22 |"
        in md
    )
    with open(fake_sweep / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["norm"] for r in table} == {"layernorm", "adanorm", "none"}
    for png in ("loss_curves_mnist.png", "loss_curves_sst5.png"):
        assert (fake_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Fixed per-seed numbers for the statistics checks (test accuracies of five seeds).
STAT_A = {1: 99.21, 2: 99.35, 3: 99.18, 4: 99.30, 5: 99.27}
STAT_B = {1: 99.10, 2: 99.31, 3: 99.20, 4: 99.12, 5: 99.19}


def test_paired_comparison_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    result = compare(STAT_A, STAT_B)
    a, b = list(STAT_A.values()), list(STAT_B.values())
    reference = stats.ttest_rel(a, b)
    low, high = reference.confidence_interval(0.95)
    assert result.test == "paired t" and result.n == 5
    assert result.delta == pytest.approx(sum(a) / 5 - sum(b) / 5)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))


def test_welch_comparison_matches_scipy_when_no_seeds_match() -> None:
    stats = pytest.importorskip("scipy.stats")
    shifted = {seed + 10: value for seed, value in STAT_B.items()}
    result = compare(STAT_A, shifted)
    reference = stats.ttest_ind(list(STAT_A.values()), list(STAT_B.values()), equal_var=False)
    low, high = reference.confidence_interval(0.95)
    assert result.test == "Welch t" and result.n == 5
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result.low, result.high) == (pytest.approx(low), pytest.approx(high))


def test_a_comparison_pairs_only_the_seeds_both_ran() -> None:
    stats = pytest.importorskip("scipy.stats")
    partial = {seed: STAT_B[seed] for seed in (1, 2, 3)} | {9: 50.0}  # seed 9: no partner
    result = compare(STAT_A, partial)
    reference = stats.ttest_rel([STAT_A[s] for s in (1, 2, 3)], [STAT_B[s] for s in (1, 2, 3)])
    assert result.test == "paired t" and result.n == 3
    assert result.delta == pytest.approx(sum(STAT_A[s] - STAT_B[s] for s in (1, 2, 3)) / 3)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)


def test_degenerate_comparisons() -> None:
    same = compare({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
    assert (same.delta, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    shifted = compare({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0})  # +1 in every seed: no doubt left
    assert (shifted.delta, shifted.low, shifted.high, shifted.p) == (1.0, 1.0, 1.0, 0.0)
    single = compare({1: 2.0}, {2: 1.0, 3: 1.5})  # one seed, none shared: no test
    assert (single.test, single.p, single.low) == ("n < 2", None, None)
    assert single.delta == pytest.approx(0.75)


def test_holm_on_a_hand_computed_example() -> None:
    # Sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4 * 0.005 = 0.02, 3 * 0.01 = 0.03,
    # 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06; None is no test and not in the family.
    adjusted = holm([0.01, None, 0.04, 0.03, 0.005])
    assert adjusted[1] is None
    assert [adjusted[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1, and monotone
    assert holm([0.04]) == [0.04] and holm([]) == []


@pytest.mark.parametrize(
    ("delta", "p_holm", "higher_is_better", "expected"),
    [
        (0.3, 0.049, True, "win"),
        (-0.3, 0.049, True, "loss"),
        (0.3, 0.05, True, "tie"),  # the boundary is not significant
        (0.3, 0.8, True, "tie"),
        (-0.02, 0.001, False, "win"),  # lower BPC or loss is better
        (0.02, 0.001, False, "loss"),
        (0.0, 0.0, True, "tie"),
        (0.3, None, True, "n/a"),  # too few seeds for a test
    ],
)
def test_verdict_rule(delta: float, p_holm: float | None, higher_is_better: bool, expected: str):
    assert verdict(delta, p_holm, higher_is_better) == expected


def test_report_corrects_over_all_comparisons_and_scores_the_claims(tmp_path: Path) -> None:
    values = {  # norm -> per-seed accuracy; LayerNorm-simple beats DetachNorm by +1.0 +- noise
        "layernorm": [99.0, 99.2, 99.1, 99.3],
        "layernorm-simple": [99.05, 99.1, 99.2, 99.2],
        "detachnorm": [98.0, 98.15, 98.2, 98.25],
        "adanorm": [99.0, 99.3, 99.1, 99.4],
    }
    for norm, accs in values.items():
        for seed, acc in enumerate(accs, start=1):
            _fake_run(tmp_path, "mnist", norm, seed, acc)
    report = write_report(tmp_path)
    md = report.markdown
    assert "corrected over all 4 tests of this report" in md  # 3 vs LayerNorm + 1 claim
    assert "Verdict: **win** when the Holm-corrected p < 0.05" in md
    lines = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| mnist |")}
    assert lines["LayerNorm-simple vs DetachNorm"].endswith("| win | -0.01 |")
    assert lines["DetachNorm"].split(" | ")[-2] == "loss"
    with open(tmp_path / "report.csv") as fh:
        table = {r["norm"]: r for r in csv.DictReader(fh)}
    p_values = [float(table[n]["p_value"]) for n in ("layernorm-simple", "detachnorm", "adanorm")]
    claim = compare(
        dict(enumerate(values["layernorm-simple"], 1)), dict(enumerate(values["detachnorm"], 1))
    )
    expected = holm([*p_values, claim.p])
    for norm, p_holm in zip(("layernorm-simple", "detachnorm", "adanorm"), expected, strict=False):
        assert float(table[norm]["p_holm"]) == pytest.approx(p_holm, rel=1e-5)
        assert float(table[norm]["ci95_low"]) < float(table[norm]["delta_vs_layernorm"])
    assert table["layernorm"]["verdict"] == "" and table["adanorm"]["n_compared"] == "4"


def test_report_counts_the_runs_whose_best_step_is_before_their_last(tmp_path: Path) -> None:
    for seed, (best, steps, early) in enumerate(
        ((10, 20, True), (20, 20, False), (5, 20, False)), 1
    ):
        run = _fake_run(tmp_path, "mnist", "layernorm", seed, 99.0 + seed / 10)
        results = json.loads((run / "results.json").read_text())
        results.update(best_step=best, steps=steps, stopped_early=early)
        (run / "results.json").write_text(json.dumps(results))
    _fake_run(tmp_path, "mnist", "adanorm", 1, 99.0)  # an older run without best_step
    md = write_report(tmp_path).markdown
    assert "| mnist | 4 | 2 (1 without best_step) | 1 |" in md


def test_the_mnist_converge_preset_stops_on_validation_not_on_a_schedule() -> None:
    from adanorm.lab.config import load_config

    cfg = load_config("mnist", "converge")
    # Validation accuracy dips for up to 3 half-epoch evaluations before improving again, so a
    # patience of 4 half-epochs stopped LayerNorm at a dip (results/mnist_converge/README.md).
    updates_per_epoch = 55_000 // cfg["data"]["batch_size"] + 1
    patience_updates = cfg["train"]["patience"] * cfg["train"]["eval_every"]
    assert patience_updates >= 4 * updates_per_epoch  # 4 epochs
    assert cfg["train"]["average_checkpoints"] == 0
    # A decaying schedule would make the result depend on the max_epochs cap.
    assert cfg["schedule"]["name"] == "constant"
    assert cfg["train"]["max_epochs"] >= 10 and cfg["train"]["max_steps"] == 0


def test_the_verdict_follows_the_test_metric_not_the_validation_metric(tmp_path: Path) -> None:
    # MT selects checkpoints on valid loss (lower is better) but reports BLEU (higher is better):
    # 11 BLEU fewer is a loss, not a win.
    for norm, bleus in {"layernorm": [35.0, 36.0, 35.5], "detachnorm": [24.0, 24.6, 24.0]}.items():
        for seed, bleu in enumerate(bleus, start=1):
            run = _fake_run(tmp_path, "multi30k", norm, seed, bleu)
            results = json.loads((run / "results.json").read_text())
            results.update(valid_metric="loss", valid_mode="min", test_metric="bleu")
            results.update(valid={"loss": 2.0}, test={"bleu": bleu})
            (run / "results.json").write_text(json.dumps(results))
    write_report(tmp_path)
    with open(tmp_path / "report.csv") as fh:
        table = {r["norm"]: r for r in csv.DictReader(fh)}
    assert table["detachnorm"]["verdict"] == "loss"
    for path in tmp_path.rglob("results.json"):
        results = json.loads(path.read_text())
        results.update(test_metric="mystery", test={"mystery": 1.0})
        path.write_text(json.dumps(results))
    with pytest.raises(ReportError, match="cannot tell whether a higher test metric 'mystery'"):
        write_report(tmp_path)


def test_report_json_cli(fake_sweep: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adanorm.lab.cli", "report", str(fake_sweep), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = json.loads(out)
    assert {(r["dataset"], r["norm"], r["n"]) for r in rows} == {
        ("mnist", "layernorm", 3),
        ("mnist", "adanorm", 3),
        ("mnist", "none", 3),
        ("sst5", "layernorm", 2),
    }


def test_report_of_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(tmp_path)


def _rows(report) -> dict[tuple[str, str, str], dict]:
    return {(r["dataset"], r["setting"], r["norm"]): r for r in report.rows}


def test_runs_of_different_configs_get_their_own_labelled_columns(tmp_path: Path) -> None:
    # The committed LM case: a 1,000-step LayerNorm run beside a 2,500-step sweep.  Pooling it
    # gave LayerNorm n = 3 and compared AdaNorm with a mixed reference.
    long = {"train.max_steps": 2500, "schedule.warmup_steps": 60}
    _fake_run(tmp_path, "lm", "layernorm", 1, 2.41, config=long)
    _fake_run(tmp_path, "lm", "layernorm", 2, 2.38, config=long)
    _fake_run(tmp_path, "lm", "adanorm", 1, 2.40, config=long)
    _fake_run(tmp_path, "lm", "adanorm", 2, 2.36, config=long)
    short = {"train.max_steps": 1000, "schedule.warmup_steps": 30}
    _fake_run(tmp_path / "long", "lm", "layernorm", 1, 2.53, config=short)
    report = write_report(tmp_path)
    rows = _rows(report)
    long_label = "schedule.warmup_steps=60, train.max_steps=2500"
    short_label = "schedule.warmup_steps=30, train.max_steps=1000"
    assert set(rows) == {
        ("lm", long_label, "layernorm"),
        ("lm", long_label, "adanorm"),
        ("lm", short_label, "layernorm"),
    }
    assert rows[("lm", long_label, "layernorm")]["n"] == 2
    assert rows[("lm", long_label, "layernorm")]["mean"] == pytest.approx(2.395)
    assert rows[("lm", short_label, "layernorm")]["n"] == 1
    md = report.markdown
    assert f"| Norm | lm [{short_label}] | lm [{long_label}] |" in md
    # Δ vs LayerNorm within the 2,500-step column only: (2.40 + 2.36 - 2.41 - 2.38) / 2
    assert re.search(rf"\| lm \[{long_label}\] \| AdaNorm \| -0\.015 \| .* paired t \(2\) \|", md)
    assert not re.search(rf"\| lm \[{short_label}\] \| AdaNorm", md)
    with open(tmp_path / "report.csv") as fh:
        table = {(r["setting"], r["norm"]): r for r in csv.DictReader(fh)}
    assert table[(short_label, "layernorm")]["n"] == "1"
    assert table[(long_label, "adanorm")]["delta_vs_layernorm"] == "-0.015"
    for index in (1, 2):
        assert (tmp_path / f"loss_curves_lm_{index}.png").exists()


def test_refuse_mixed_names_the_keys_that_differ(tmp_path: Path) -> None:
    _fake_run(tmp_path, "lm", "layernorm", 1, 2.41, config={"train.max_steps": 2500})
    _fake_run(tmp_path / "b", "lm", "layernorm", 1, 2.53, config={"train.max_steps": 1000})
    with pytest.raises(ReportError, match=r"runs of lm differ in config keys train\.max_steps "):
        write_report(tmp_path, refuse_mixed=True)
    assert not (tmp_path / "report.md").exists()
    result = subprocess.run(
        [sys.executable, "-m", "adanorm.lab.cli", "report", str(tmp_path), "--refuse-mixed"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "train.max_steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_that_cannot_matter_do_not_split_a_column(tmp_path: Path) -> None:
    # Threads, progress bar, logging and checkpoint intervals, download switch and data/cache
    # directories never change what a run measures; a run from before average_checkpoints
    # existed ran what average_checkpoints=0 means.
    _fake_run(tmp_path, "mnist", "layernorm", 1, 99.0)
    _fake_run(
        tmp_path,
        "mnist",
        "layernorm",
        2,
        99.2,
        config={
            "train.threads": 4,
            "train.progress": False,
            "train.log_every": 7,
            "train.checkpoint_every": 3,
            "train.deterministic": False,
            "train.device": "cpu",
            "train.average_checkpoints": _ABSENT,
            "data.download": True,
            "data.cache_dir": "/elsewhere/cache",
        },
    )
    rows = _rows(write_report(tmp_path))
    assert rows[("mnist", "", "layernorm")]["n"] == 2


@pytest.mark.parametrize(
    ("changes", "device", "label"),
    [
        ({"train.average_checkpoints": 5}, "cpu", "train.average_checkpoints=5"),
        ({"data.max_examples": 100}, "cpu", "data.max_examples=100"),
        ({"train.eval_every": "epoch"}, "cpu", "train.eval_every=epoch"),
        # a task key the base lacks (cv10 runs always name their fold, a replicate key)
        ({"data.protocol": "cv10", "data.cv_fold": 0}, "cpu", "data.protocol=cv10"),
        ({}, "cuda:1", "device=cuda"),  # the device actually used (run.json), not train.device
        ({}, None, "device=(absent)"),  # no run.json: unknown device, not assumed equal
    ],
)
def test_keys_that_can_matter_split_a_column(
    tmp_path: Path, changes: dict, device: str | None, label: str
) -> None:
    _fake_run(tmp_path, "mnist", "layernorm", 1, 99.0)
    _fake_run(tmp_path / "b", "mnist", "layernorm", 2, 99.2, config=changes, device=device)
    rows = _rows(write_report(tmp_path))
    assert len(rows) == 2 and all(row["n"] == 1 for row in rows.values())
    assert label in {setting for _, setting, _ in rows}


def test_a_duplicate_seed_is_an_error_naming_both_run_directories(tmp_path: Path) -> None:
    first = _fake_run(tmp_path, "mnist", "layernorm", 1, 99.0)
    # A different thread count is not a different experiment: still the same run twice.
    second = _fake_run(
        tmp_path / "again", "mnist", "layernorm", 1, 99.1, config={"train.threads": 2}
    )
    with pytest.raises(ReportError, match="seed 1 of mnist layernorm ran twice") as caught:
        write_report(tmp_path)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def _cv_run(root: Path, norm: str, fold: int, acc: float, seed: int = 1) -> Path:
    return _fake_run(
        root / f"fold{fold}",
        "rt",
        norm,
        seed,
        acc,
        config={"data.protocol": "cv10", "data.cv_fold": fold},
    )


def test_cross_validation_folds_are_replicates_paired_by_fold(tmp_path: Path) -> None:
    # Without fold replicates, the 10 folds of RT cv10 were 10 columns of n = 1 (or, pooled by
    # seed, one "seed 1 ran twice" error).  AdaNorm is LayerNorm + 1 on every fold: a paired
    # test sees a constant difference, a test across unpaired folds would not.
    ln = {0: 70.0, 1: 75.0, 2: 72.0}
    for fold, acc in ln.items():
        _cv_run(tmp_path, "layernorm", fold, acc)
        _cv_run(tmp_path, "adanorm", fold, acc + 1.0)
    runs = collect_runs(tmp_path)
    label_settings(runs, refuse_mixed=True)
    rows = {r["norm"]: r for r in summarize(runs)}
    assert set(rows) == {"layernorm", "adanorm"} and rows["layernorm"]["n"] == 3
    assert rows["adanorm"]["_seeds"] == {f"fold{f}/seed1": acc + 1.0 for f, acc in ln.items()}
    paired = compare(rows["adanorm"]["_seeds"], rows["layernorm"]["_seeds"])
    assert paired.test == "paired t" and paired.n == 3 and paired.delta == pytest.approx(1.0)
    assert paired.p == 0.0
    md = write_report(tmp_path).markdown
    assert re.search(r"\| rt \| AdaNorm \| \+?1\.00? \|.* paired t \(3\) \|", md), md


def test_a_cross_validation_fold_run_twice_is_an_error(tmp_path: Path) -> None:
    _cv_run(tmp_path, "layernorm", 4, 70.0)
    _cv_run(tmp_path / "again", "layernorm", 4, 71.0)
    with pytest.raises(ReportError, match="seed fold4/seed1 of rt layernorm ran twice"):
        write_report(tmp_path)


def test_a_fold_outside_cross_validation_still_splits_a_column(tmp_path: Path) -> None:
    # data.cv_fold is a replicate key only under a cross-validation protocol.
    _fake_run(tmp_path, "rt", "layernorm", 1, 70.0, config={"data.cv_fold": 0})
    _fake_run(tmp_path / "b", "rt", "layernorm", 2, 71.0, config={"data.cv_fold": 1})
    rows = _rows(write_report(tmp_path))
    assert len(rows) == 2


def test_one_label_for_two_different_norms_is_an_error(tmp_path: Path) -> None:
    # C = 1 and C = 1.0000001 both print as adanorm(C=1): pooling them would hide a difference.
    _fake_run(tmp_path, "mnist", "adanorm", 1, 99.0, norm_kwargs={"scale": 1})
    _fake_run(tmp_path / "b", "mnist", "adanorm", 2, 99.1, norm_kwargs={"scale": 1.0000001})
    with pytest.raises(ReportError, match=r"the label adanorm\(C=1\) of mnist stands for"):
        write_report(tmp_path)


def _cli_report(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adanorm.lab.cli", "report", str(path)],
        capture_output=True,
        text=True,
    )


def _break_results(run: Path) -> Path:
    (run / "results.json").write_text('{"task": "x", "dataset": ')
    return run / "results.json"


def _break_metrics(run: Path) -> Path:
    # What a resume over a truncated log used to leave: a line of NUL bytes.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("\0" * 40 + "\n")
    return run / "metrics.jsonl"


def _metrics_without_loss(run: Path) -> Path:
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 10}\n')
    return run / "metrics.jsonl"


def _results_without_metric(run: Path) -> Path:
    results = json.loads((run / "results.json").read_text())
    del results["test"]["acc"]
    (run / "results.json").write_text(json.dumps(results))
    return run / "results.json"


def _break_config(run: Path) -> Path:
    (run / "config.yaml").write_text("model: [unclosed\n")
    return run / "config.yaml"


def _drop_config(run: Path) -> Path:
    (run / "config.yaml").unlink()
    return run / "config.yaml"


def _break_run_json(run: Path) -> Path:
    (run / "run.json").write_text("not json")
    return run / "run.json"


@pytest.mark.parametrize(
    "damage",
    [
        _break_results,
        _results_without_metric,
        _break_metrics,
        _metrics_without_loss,
        _break_config,
        _drop_config,
        _break_run_json,
    ],
)
def test_a_damaged_run_file_is_one_line_naming_it_with_exit_status_2(
    tmp_path: Path, damage
) -> None:
    _fake_run(tmp_path, "mnist", "layernorm", 1, 99.0)
    bad = damage(_fake_run(tmp_path, "mnist", "layernorm", 2, 99.2))
    result = _cli_report(tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"adanorm report: error: {bad}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "report.md").exists()  # nothing half-written


def test_a_missing_directory_is_one_line_with_exit_status_2(tmp_path: Path) -> None:
    result = _cli_report(tmp_path / "nonexistent")
    assert result.returncode == 2
    assert result.stderr == (
        f"adanorm report: error: {tmp_path / 'nonexistent'} is not a directory; give the "
        "directory that holds the runs (their results.json files)\n"
    )
    empty = _cli_report(tmp_path)
    assert empty.returncode == 2 and "no finished runs" in empty.stderr
    assert empty.stderr.count("\n") == 1


def test_textcls_select_regenerates_its_reports_in_place(tmp_path: Path) -> None:
    from adanorm.lab.select import select_and_report

    runs = tmp_path / "runs"
    for seed, acc in ((1, 73.0), (2, 74.0)):
        _fake_run(runs, "rt", "layernorm", seed, acc)
        better = acc + 0.5 + seed / 2  # +1.0, +1.5 over LayerNorm
        _fake_run(runs, "rt", "adanorm", seed, better, name="adanorm_C1", norm_kwargs={"scale": 1})
        _fake_run(
            runs,
            "rt",
            "adanorm",
            seed,
            90.0,
            name="adanorm_C2",
            norm_kwargs={"scale": 2},
            valid=1.0,
        )
    # The committed copies are both the input and the place the copies go: no SameFileError.
    assert select_and_report(runs, tmp_path) == {"rt": 1.0}
    table = (tmp_path / "report.csv").read_text().splitlines()
    rows = {r["norm"]: r for r in csv.DictReader(table)}
    assert set(rows) == {"layernorm", "adanorm(C=1)"}  # C = 2 lost on validation
    assert rows["adanorm(C=1)"]["delta_vs_layernorm"] == "1.25"
    assert "| rt | 2 | 2 |" in (tmp_path / "adanorm_C_selection.md").read_text()
    # C is chosen over the seeds of one config: a run of another config is refused, not pooled.
    _fake_run(runs, "rt", "layernorm", 3, 70.0, name="longer", config={"train.max_steps": 99})
    with pytest.raises(ReportError, match="runs of rt differ in config keys train.max_steps"):
        select_and_report(runs, tmp_path)


def test_select_never_calls_the_only_finished_c_a_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adanorm.lab.select import main as select_main
    from adanorm.lab.select import select_and_report

    runs = tmp_path / "runs"
    _fake_run(runs, "rt", "layernorm", 1, 73.0)
    _fake_run(runs, "rt", "adanorm", 1, 74.0, name="adanorm_C0.5", norm_kwargs={"scale": 0.5})
    out = tmp_path / "out"
    assert select_main([str(runs), str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == "rt: AdaNorm C = 0.5, the only C with a finished run (not chosen)\n"
    assert "C=0.5, the only C with a finished run)" in (out / "report.md").read_text()
    assert "nothing was chosen yet" in (out / "adanorm_C_selection.md").read_text()
    # With the Cs that were meant, a missing one is an error naming it, and nothing is written.
    with pytest.raises(ValueError, match=r"rt has no finished AdaNorm run at C = 1, 3 "):
        select_and_report(runs, tmp_path / "strict", required_scales=[0.5, 1, 3])
    assert not (tmp_path / "strict").exists()
    assert select_main([str(runs), str(tmp_path / "x"), "--require-scales", "0.5,1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "C = 1 (--require-scales 0.5,1)" in error
    assert select_main([str(runs), str(tmp_path / "x"), "--require-scales", "0.5,-1"]) == 2
    assert "expected positive Cs" in capsys.readouterr().err
    # Once a second C finishes, the choice is a real one and is reported as such.
    _fake_run(runs, "rt", "adanorm", 1, 70.0, name="adanorm_C1", norm_kwargs={"scale": 1})
    assert select_main([str(runs), str(out), "--require-scales", "0.5,1"]) == 0
    assert "(best mean validation metric)" in capsys.readouterr().out
    assert "nothing was chosen" not in (out / "adanorm_C_selection.md").read_text()


def _plan(root: Path, runs: list[str], **extra: object) -> None:
    """The ``sweep.json`` that ``adanorm sweep`` writes at the top of its ``--out``."""
    plan = {"task": "textcls", "preset": "cpu", "overrides": [], "command": "x", "runs": runs}
    (root / "sweep.json").write_text(json.dumps({**plan, **extra}))


def test_select_calls_a_choice_interim_while_its_sweep_plans_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adanorm.lab.select import main as select_main
    from adanorm.lab.select import select_and_report

    runs = tmp_path / "runs"
    _fake_run(runs, "rt", "layernorm", 1, 73.0)
    for scale, valid in ((0.5, 70.0), (1, 72.0)):
        kwargs = {"scale": scale}
        _fake_run(
            runs,
            "rt",
            "adanorm",
            1,
            75.0,
            name=f"adanorm_C{scale:g}",
            norm_kwargs=kwargs,
            valid=valid,
        )
    # Stage 1 of the sweep plans C = 3 too, and it has not finished (nor started).
    stage1 = [
        "rt/layernorm/seed1",
        "rt/adanorm_C0.5/seed1",
        "rt/adanorm_C1/seed1",
        "rt/adanorm_C3/seed1",
        "rt/none/seed1",
    ]
    _plan(runs, stage1)
    out = tmp_path / "out"
    assert select_main([str(runs), str(out)]) == 0
    assert capsys.readouterr().out == (
        "rt: AdaNorm C = 1, best so far (interim: C = 3 (seed 1) not finished)\n"
    )
    selection = (out / "adanorm_C_selection.md").read_text()
    assert "| rt | 1 | 1 | 72.00 ± — | 75.00 ± — | 72.00 (n = 1) | best so far (interim) |" in (
        selection
    )
    assert "**yes**" not in selection
    assert "would enter the comparison: C = 3 (seed 1)." in selection
    assert "(rt: C=1, interim: C = 3 (seed 1) not finished)" in (out / "report.md").read_text()
    # The plan travels with the copies, so they regenerate the same interim table.
    assert json.loads((out / "runs" / "sweep.json").read_text())["runs"] == stage1
    again = tmp_path / "again"
    select_and_report(out / "runs", again)
    assert (again / "adanorm_C_selection.md").read_text() == selection
    # A real choice is refused until the plan is done, in one line naming the missing run.
    assert select_main([str(runs), str(tmp_path / "x"), "--require-scales", "0.5,1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "rt has unfinished planned AdaNorm runs at C = 3 (seed 1)" in error
    assert not (tmp_path / "x").exists()
    # Once C = 3 finishes, the choice is real.
    _fake_run(
        runs, "rt", "adanorm", 1, 71.0, name="adanorm_C3", norm_kwargs={"scale": 3}, valid=60.0
    )
    assert select_main([str(runs), str(out), "--require-scales", "0.5,1,3"]) == 0
    assert capsys.readouterr().out == "rt: AdaNorm C = 1 (best mean validation metric)\n"
    assert "| 72.00 (n = 1) | **yes** |" in (out / "adanorm_C_selection.md").read_text()
    # Stage 2: more seeds of the chosen C alone cannot change the choice: not interim.
    _plan(
        runs,
        ["rt/layernorm/seed1", "rt/layernorm/seed2", "rt/adanorm_C1/seed1", "rt/adanorm_C1/seed2"],
    )
    assert select_and_report(runs, out, required_scales=[0.5, 1, 3]) == {"rt": 1.0}
    # Seed 2 of every C planned and unfinished: it would join the seeds C is chosen over.
    _plan(runs, [f"rt/adanorm_C{c}/seed2" for c in ("0.5", "1", "3")])
    select_main([str(runs), str(out)])
    assert capsys.readouterr().out == (
        "rt: AdaNorm C = 1, best so far (interim: C = 0.5 (seed 2); C = 1 (seed 2); "
        "C = 3 (seed 2) not finished)\n"
    )
    (runs / "sweep.json").write_text("{")
    assert select_main([str(runs), str(out)]) == 2
    assert "sweep.json: not a sweep plan as adanorm sweep writes it" in capsys.readouterr().err


def test_a_sweep_run_path_parses_back_to_its_run() -> None:
    from adanorm.lab.sweep import parse_run_path

    planned = plan_sweep(
        "digits",
        Path("out"),
        ["layernorm-simple", "adanorm", "detachnorm"],
        [1, 12],
        scales=[0.5, 1.0, 2.5],
    )
    for run in planned:
        relative = run.run_dir.relative_to("out")
        assert parse_run_path(relative) == replace(run, run_dir=relative)
    for bad in ("digits/adanorm_C1", "digits/adanorm/run1", "a/b/c/seed1", "digits/_C2/seed1"):
        with pytest.raises(ValueError, match=f"sweep run {bad!r}: .*<dataset>/<norm>"):
            parse_run_path(bad)


REGENERATE = {  # results directory -> the command its README gives
    "mnist": "adanorm report results/mnist/runs --out results/mnist",
    "mnist_converge": "adanorm report results/mnist_converge/runs --out results/mnist_converge",
    "lm": "adanorm report results/lm/runs --out results/lm",
    "mt": "adanorm report results/mt/runs --out results/mt",
    "parsing": "adanorm report results/parsing/runs --out results/parsing",
    "textcls": "python -m adanorm.lab.select results/textcls/runs results/textcls",
    "converge/mnist": "python -m adanorm.lab.select results/converge/mnist/runs "
    "results/converge/mnist",
    "converge/sst5": "python -m adanorm.lab.select results/converge/sst5/runs "
    "results/converge/sst5",
    "converge/sst5_cpu": "python -m adanorm.lab.select results/converge/sst5_cpu/runs "
    "results/converge/sst5_cpu",
    "converge/rt_cpu": "python -m adanorm.lab.select results/converge/rt_cpu/runs "
    "results/converge/rt_cpu",
    "converge/parsing_cpu": "python -m adanorm.lab.select results/converge/parsing_cpu/runs "
    "results/converge/parsing_cpu",
    "converge/lm_cpu": "python -m adanorm.lab.select results/converge/lm_cpu/runs "
    "results/converge/lm_cpu",
    "converge/mt_cpu": "python -m adanorm.lab.select results/converge/mt_cpu/runs "
    "results/converge/mt_cpu",
}
# Columns whose tables choose AdaNorm's C on validation (textcls_select writes three tables).
SELECTED = {
    "textcls",
    "converge/mnist",
    "converge/sst5",
    "converge/sst5_cpu",
    "converge/rt_cpu",
    "converge/parsing_cpu",
    "converge/lm_cpu",
    "converge/mt_cpu",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGENERATE))
def test_committed_tables_regenerate_from_the_committed_runs(name: str, tmp_path: Path) -> None:
    results = REPO / "results" / name
    if not (results / "runs").is_dir():
        pytest.skip(f"{results / 'runs'} not found")
    # A column of a larger study is documented in the study's README (results/converge).
    readme_path = next(
        p / "README.md" for p in (results, results.parent) if (p / "README.md").is_file()
    )
    assert REGENERATE[name] in readme_path.read_text(), f"{readme_path} lacks {REGENERATE[name]!r}"
    if name in SELECTED:
        from adanorm.lab.select import select_and_report

        copy = tmp_path / "runs"
        shutil.copytree(results / "runs", copy)
        select_and_report(copy, tmp_path)
        tables = ["report.csv", "all_scales/report.csv", "adanorm_C_selection.md"]
    else:
        write_report(results / "runs", tmp_path)
        tables = ["report.csv"]
    for table in tables:
        assert (tmp_path / table).read_text() == (results / table).read_text(), (
            f"results/{name}/{table} is not what its runs give: run `{REGENERATE[name]}`"
        )


def test_paper_numbers_cover_eight_columns_and_five_norms() -> None:
    table = paper_table()
    assert list(table["columns"]) == [
        "en-de",
        "de-en",
        "en-vi",
        "enwik8",
        "rt",
        "sst5",
        "mnist",
        "ptb",
    ]
    for norm, row in table["results"].items():
        assert set(row) == set(table["columns"]), norm
    assert paper_number("mnist", "adanorm") == 99.35
    assert paper_number("MNIST", "layernorm-simple") == 99.09
    assert paper_number("en-de", "none") == "diverge"
    assert paper_number("tiny_shakespeare", "layernorm") is None


PAPER_MD = REPO.parent / "shared" / "paper.md"


@pytest.mark.skipif(not PAPER_MD.exists(), reason=f"{PAPER_MD} not found")
def test_paper_numbers_equal_the_tables_in_paper_md() -> None:
    names = {
        "w/o Norm": "none",
        "LayerNorm": "layernorm",
        "LayerNorm-simple": "layernorm-simple",
        "DetachNorm": "detachnorm",
        "**AdaNorm**": "adanorm",
    }
    table = paper_table()
    columns = list(table["columns"])
    seen = set()
    for line in PAPER_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in names:
            norm = names[cells[0]]
            for column, cell in zip(columns, cells[1:], strict=True):
                value = cell.strip("*")
                expected = "diverge" if value == "Diverge" else float(value)
                assert table["results"][norm][column] == expected, (norm, column)
            seen.add(norm)
    assert seen == set(names.values())


def test_sweep_layout_runs_and_skips_finished_runs(tmp_path: Path) -> None:
    runs = plan_sweep("digits", tmp_path, ["layernorm", "adanorm"], [1], scales=[1.0, 2.0])
    assert [str(r.run_dir.relative_to(tmp_path)) for r in runs] == [
        "digits/layernorm/seed1",
        "digits/adanorm_C1/seed1",
        "digits/adanorm_C2/seed1",
    ]
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        plan_sweep("digits", tmp_path, ["batchnorm"], [1])
    small = ["train.max_steps=6", "train.eval_every=3"]
    first = run_sweep("digits", tmp_path, runs[1:], preset="smoke", overrides=small, jobs=2)
    assert [code for _, code in first] == [0, 0]
    stamp = (runs[1].run_dir / "results.json").stat().st_mtime_ns
    second = run_sweep("digits", tmp_path, runs[1:], preset="smoke", overrides=small)
    assert second == []  # both runs were finished: nothing was re-run
    assert (runs[1].run_dir / "results.json").stat().st_mtime_ns == stamp
    rows = {r["norm"]: r for r in write_report(tmp_path).rows}
    assert set(rows) == {"adanorm(C=1)", "adanorm(C=2)"}
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["preset"] == "smoke" and len(sweep["runs"]) == 2


def test_demo_end_to_end_on_a_smoke_preset(tmp_path: Path) -> None:
    from adanorm.lab.demo import run_demo

    report = run_demo(tmp_path, seeds=1, threads=1, preset="smoke", verbose=False)
    assert {r["norm"] for r in report.rows} == {
        "layernorm",
        "layernorm-simple",
        "none",
        "detachnorm",
        "adanorm",
    }
    assert (tmp_path / "loss_curves_digits.png").exists()
    assert "| DetachNorm |" in report.markdown


@pytest.mark.slow
def test_divergence_and_gap_tables_regenerate_from_the_committed_runs(tmp_path: Path) -> None:
    divergence = REPO / "results" / "divergence"
    converge = REPO / "results" / "converge"
    if not (divergence / "report.md").is_file() or not (converge / "gap.md").is_file():
        pytest.skip("results/divergence or results/converge/gap.md not found")
    copy = tmp_path / "divergence"
    shutil.copytree(divergence, copy, ignore=shutil.ignore_patterns("report.md", "*.png"))
    subprocess.run(
        [sys.executable, str(divergence / "analyze.py"), str(copy)], check=True, capture_output=True
    )
    assert (copy / "report.md").read_text() == (divergence / "report.md").read_text(), (
        "results/divergence/report.md is not what its runs give: run "
        "`python results/divergence/analyze.py results/divergence`"
    )
    committed = (converge / "gap.md").read_text()
    command = re.search(r"`python results/converge/gap.py (\S+) ([^`]+)`", committed)
    assert command, "results/converge/gap.md does not name the command that made it"
    out = tmp_path / "gap.md"
    subprocess.run(
        [sys.executable, str(converge / "gap.py"), str(out), *command.group(2).split()],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    assert out.read_text().replace(str(out), command.group(1)) == committed, (
        f"results/converge/gap.md is not what its runs give: run `{command.group(0)}`"
    )


def _divergence_run(root: Path, norm: str, seed: int, environment: dict, losses: list) -> Path:
    run = root / "paper_warmup" / "runs" / "multi30k" / norm / f"seed{seed}"
    run.mkdir(parents=True)
    rows = [{"split": "train", "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run.json").write_text(json.dumps({"environment": environment}))
    (run / "train.log").write_text("")
    return run


def test_divergence_table_names_each_seeds_device_and_refuses_an_unknown_one(
    tmp_path: Path,
) -> None:
    h200 = {"device": "cuda", "cuda_device": "NVIDIA H200"}
    trained = [9.0] * 12 + [5.0]
    for seed in (1, 2):
        run = _divergence_run(tmp_path, "none", seed, h200, [150.0] * 20 + [200.0])
        (run / "train.log").write_text(
            "adanorm train: error: non-finite training loss nan at step 364 (noticed at step 370)\n"
        )
    _divergence_run(tmp_path, "none", 3, {"device": "cpu"}, [150.0] * 5)  # still running
    for seed in (1, 2, 3):
        run = _divergence_run(tmp_path, "detachnorm", seed, {"device": "cpu"}, trained)
        (run / "results.json").write_text("{}")
    analyze = [sys.executable, str(REPO / "results" / "divergence" / "analyze.py"), str(tmp_path)]
    subprocess.run(analyze, check=True, capture_output=True)
    rows = {
        line.split(" | ")[1]: line.split(" | ")[2:4]
        for line in (tmp_path / "report.md").read_text().splitlines()
        if line.startswith("| paper's")
    }
    assert rows["w/o Norm"] == [
        "1, 2: NVIDIA H200; 3: CPU",
        "1: non-finite, 2: non-finite, 3: unfinished",
    ]
    assert rows["DetachNorm"] == ["CPU", "1: trained, 2: trained, 3: trained"]
    # A run whose device cannot be read is refused: its outcome could be the device's.
    _divergence_run(tmp_path, "layernorm", 1, {"device": "mps"}, trained)
    failed = subprocess.run(analyze, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "environment.device is 'mps'" in failed.stderr


def _set_losses(run: Path, train_loss: float, valid_loss: float) -> None:
    """Give a fake run one evaluation interval: best step 20, the given losses there."""
    results = json.loads((run / "results.json").read_text())
    results["best_step"] = 20
    (run / "results.json").write_text(json.dumps(results))
    lines = [
        {"split": "train", "step": 10, "loss": 9.0, "acc": 50.0},
        {"split": "valid", "step": 10, "loss": 9.0, "acc": 50.0},
        {"split": "train", "step": 20, "loss": train_loss, "acc": 90.0},
        {"split": "valid", "step": 20, "loss": valid_loss, "acc": 80.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_gap_compares_adanorm_at_the_chosen_c_only(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        for norm in ("layernorm", "layernorm-simple"):
            _set_losses(_fake_run(runs, "mnist", norm, seed, 99.0), 0.10, 0.30 + seed / 100)
        # C = 2 has the better validation accuracy, so it is the one compared with LayerNorm.
        for scale, valid, train_loss in ((1.0, 97.0, 0.50), (2.0, 98.0, 0.20 + seed / 100)):
            _set_losses(
                _fake_run(
                    runs,
                    "mnist",
                    "adanorm",
                    seed,
                    99.0,
                    name=f"adanorm_C{scale:g}",
                    norm_kwargs={"scale": scale},
                    valid=valid,
                ),
                train_loss,
                0.25,
            )
    out = tmp_path / "gap.md"
    subprocess.run(
        [sys.executable, str(REPO / "results" / "converge" / "gap.py"), str(out), str(runs)],
        check=True,
        capture_output=True,
    )
    table = out.read_text().split("## Does AdaNorm generalize better?")[1]
    rows = [line for line in table.splitlines() if line.startswith(f"| {runs} (mnist)")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["2", "train loss"],
        ["2", "valid loss"],
        ["2", "loss gap"],
    ]
    # AdaNorm C = 2 minus LayerNorm: train loss 0.22 - 0.10, valid loss 0.25 - 0.32.
    assert " | 0.100 ± 0.000 | 0.220 ± 0.010 | +0.120 | " in rows[0]
    assert " | 0.320 ± 0.010 | 0.250 ± 0.000 | -0.070 | " in rows[1]
