"""Reports (tables, Δ vs LayerNorm with a test across seeds, plots), sweeps, the demo and the
bundled paper numbers."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lab_helpers import REPO

from adanorm.lab.paper_numbers import paper_number, paper_table
from adanorm.lab.report import write_report
from adanorm.lab.sweep import plan_sweep, run_sweep

ACCS = {  # dataset -> norm -> per-seed test accuracy
    "mnist": {
        "layernorm": [99.0, 99.2, 99.1],
        "adanorm": [99.3, 99.5, 99.4],
        "none": [98.0, 99.0, 98.5],
    },
    "sst5": {"layernorm": [40.0, 41.0]},
}


def _fake_run(root: Path, dataset: str, norm: str, seed: int, acc: float) -> None:
    run = root / dataset / norm / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": "x",
                "dataset": dataset,
                "norm": norm,
                "norm_kwargs": {},
                "norm_label": norm,
                "seed": seed,
                "valid_metric": "acc",
                "valid_mode": "max",
                "test_metric": "acc",
                "test_metric_label": "accuracy (%)",
                "valid": {"acc": acc},
                "test": {"acc": acc},
            }
        )
    )
    lines = [
        {"split": s, "step": k, "loss": 1.0 / (k + seed)}
        for k in (10, 20)
        for s in ("train", "valid")
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


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
    assert set(report.rows[0]) == {"dataset", "norm", "metric", "mean", "std", "n"}
    assert rows[("mnist", "adanorm")]["mean"] == pytest.approx(99.4)
    assert rows[("mnist", "adanorm")]["std"] == pytest.approx(0.1)
    assert rows[("mnist", "none")]["std"] == pytest.approx(0.5)
    assert rows[("sst5", "layernorm")]["n"] == 2
    md = (fake_sweep / "report.md").read_text()
    assert "| LayerNorm |" in md and "| AdaNorm |" in md
    assert "paper 99.35" in md and "paper 39.23" in md  # the paper's numbers side by side
    # AdaNorm - LayerNorm = +0.30 in every seed: paired differences are constant, so the paired
    # t-test's p is 0 (scipy) — the test across seeds must see seed pairing.
    assert re.search(r"\| AdaNorm \| \+0\.30 \(p=0\.000, paired t\) · paper \+0\.22", md)
    with open(fake_sweep / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["norm"] for r in table} == {"layernorm", "adanorm", "none"}
    for png in ("loss_curves_mnist.png", "loss_curves_sst5.png"):
        assert (fake_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
