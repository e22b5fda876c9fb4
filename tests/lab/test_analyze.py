"""`adanorm analyze` end to end on the digits smoke preset (bundled data, seconds)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from adanorm.lab.analyze import analyze
from adanorm.lab.cli import main

REPO = Path(__file__).resolve().parents[2]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_analyze_checks_theorem1_on_real_training(tmp_path):
    tables = analyze(
        "digits",
        ["layernorm-simple", "detach-mean", "detach-std", "detachnorm", "adanorm"],
        out=tmp_path,
        preset="smoke",
        scales=[0.5, 2.0],
        depths=[[4], [4, 8, 8]],
        depth_key="model.channels",
        overrides=["train.max_steps=8", "train.eval_every=4"],
        gradstats_every=2,
    )
    assert set(tables) == {"theorem1", "generalization", "scale_sweep", "depth_ablation"}
    theorem = {row["variant"]: row for row in _rows(tmp_path / "theorem1.csv")}
    for variant in ("layernorm-simple", "detach-mean", "detach-std", "detachnorm"):
        assert theorem[variant]["mean"] == "agrees", theorem[variant]
        assert theorem[variant]["variance"] == "agrees", theorem[variant]
    assert float(theorem["detach-std"]["Var ratio (median)"]) == 1.0
    assert float(theorem["layernorm-simple"]["Var ratio (median)"]) < 1.0
    assert float(theorem["adanorm(C=1)"]["|mean(dx)|/rms(dx)"]) < 1e-3
    sweep = {row["norm"] for row in _rows(tmp_path / "scale_sweep.csv")}
    assert sweep == {"adanorm(C=0.5)", "adanorm(C=2)"}
    depths = {row["depth"] for row in _rows(tmp_path / "depth_ablation.csv")}
    assert depths == {"1", "3"}
    assert (tmp_path / "gradstats_adanorm-C1.png").stat().st_size > 10_000
    # The statistics are logged in each run's metrics.jsonl, every 2 updates.
    text = (tmp_path / "runs/detachnorm_s1/metrics.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    steps = [line["step"] for line in lines if line["split"] == "gradstats"]
    assert steps == [1, 3, 5, 7]


def test_analyze_command_resumes_finished_runs(tmp_path, capsys):
    args = ["analyze", "digits", "--preset", "smoke", "--norms", "detach-std", "--scales", "",
            "--every", "4", "--out", str(tmp_path), "--set", "train.max_steps=4"]
    assert main(args) == 0
    first = (tmp_path / "runs/detach-std_s1/metrics.jsonl").read_text()
    assert main(args) == 0  # finished runs are reused, not retrained
    assert (tmp_path / "runs/detach-std_s1/metrics.jsonl").read_text() == first
    assert "Theorem 1 on real training" in capsys.readouterr().out


def test_variance_verdicts_judge_only_the_bound_the_recorder_measures():
    """LayerNorm's Theorem-1 bound is in w*g and AdaNorm's in phi*g, while the recorder's ratio
    uses g: those are reported, never judged (a gain > 1 made LayerNorm read "DISAGREES")."""
    from adanorm.lab.analyze import THEOREM1_EXPECTATIONS, _verdict_ratio

    assert _verdict_ratio(THEOREM1_EXPECTATIONS["layernorm"][1], 1.03) == "n/a (bound is in w*g)"
    assert _verdict_ratio(THEOREM1_EXPECTATIONS["adanorm"][1], 0.8).startswith("n/a")
    assert _verdict_ratio(THEOREM1_EXPECTATIONS["layernorm-simple"][1], 1.03) == "DISAGREES"
    assert _verdict_ratio(THEOREM1_EXPECTATIONS["layernorm-simple"][1], 0.97) == "agrees"
    assert _verdict_ratio(THEOREM1_EXPECTATIONS["detachnorm"][1], 1.0) == "agrees"
    assert _verdict_ratio(THEOREM1_EXPECTATIONS["none"][1], float("nan")) == "-"


def test_a_variant_without_norm_layers_is_named_not_a_nan_row(tmp_path):
    # w/o Norm has no norm layer, so nothing to measure: the table said "nan" and plotted an
    # empty figure.
    analyze("digits", ["none", "layernorm-simple"], out=tmp_path, preset="smoke", scales=[],
            overrides=["train.max_steps=4", "train.eval_every=4"], gradstats_every=2)
    theorem = {row["variant"]: row for row in _rows(tmp_path / "theorem1.csv")}
    assert theorem["none"]["|mean(dx)|/rms(dx)"] == "no norm layer"
    assert "nan" not in ",".join(theorem["none"].values())
    assert theorem["layernorm-simple"]["mean"] == "agrees"
    assert not (tmp_path / "gradstats_none.png").exists()
    assert (tmp_path / "gradstats_layernorm-simple.png").exists()


def test_a_finished_run_is_reused_only_for_the_same_config(tmp_path, capsys):
    args = ["analyze", "digits", "--preset", "smoke", "--norms", "detach-std", "--scales", "",
            "--every", "4", "--out", str(tmp_path), "--set", "train.max_steps=4"]
    assert main(args) == 0
    capsys.readouterr()
    # A different learning rate is a different experiment: the finished run must not stand in.
    assert main([*args, "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "finished with a different config: optim.lr" in err and len(err.splitlines()) == 1


def test_committed_runs_with_gzipped_metrics_regenerate_the_tables(tmp_path, capsys):
    import gzip
    import shutil

    args = ["analyze", "digits", "--preset", "smoke", "--norms", "detach-std", "--scales", "",
            "--every", "4", "--out", str(tmp_path), "--set", "train.max_steps=4"]
    assert main(args) == 0
    table = (tmp_path / "theorem1.md").read_text()
    metrics = tmp_path / "runs/detach-std_s1/metrics.jsonl"
    with open(metrics, "rb") as src, gzip.open(f"{metrics}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    metrics.unlink()
    (tmp_path / "theorem1.md").unlink()
    assert main(args) == 0
    assert (tmp_path / "theorem1.md").read_text() == table


# The commands in docs/analysis.md that wrote the committed analysis folders.
COMMITTED_ANALYSES = {
    "mnist": [
        "analyze", "mnist", "--preset", "cpu", "--norms",
        "layernorm,none,layernorm-simple,detach-mean,detach-std,detachnorm,adanorm",
        "--scales", "0.5,1,2,3", "--every", "20", "--set", "train.max_epochs=2",
        "model.channels=[32,64,128]", "--threads", "1",
    ],
    "textcls-sst5": [
        "analyze", "textcls", "--preset", "cpu", "--set", "data.name=sst5", "--seeds", "2",
        "--norms", "layernorm,none,layernorm-simple,detach-mean,detach-std,detachnorm,adanorm",
        "--scales", "0.5,1,2,3", "--every", "10", "--threads", "1",
    ],
}


@pytest.mark.parametrize("name", sorted(COMMITTED_ANALYSES))
def test_committed_analysis_tables_regenerate_from_the_committed_runs(name, tmp_path, capsys):
    import shutil

    results = REPO / "results" / "analysis" / name
    if not (results / "runs").is_dir():
        pytest.skip(f"{results / 'runs'} not found")
    if not os.environ.get("ADANORM_DATA"):
        pytest.skip("ADANORM_DATA not set")
    args = [*COMMITTED_ANALYSES[name], "--out", str(tmp_path)]
    documented = " ".join(COMMITTED_ANALYSES[name][:3])
    assert documented in (REPO / "docs/analysis.md").read_text()
    shutil.copytree(results / "runs", tmp_path / "runs")
    # Every run is finished: nothing trains, the tables come from the records alone.
    assert main(args) == 0
    for table in ("theorem1.md", "generalization.md", "scale_sweep.md", "theorem1.csv"):
        assert (tmp_path / table).read_text() == (results / table).read_text(), (
            f"results/analysis/{name}/{table} is not what its runs give (docs/analysis.md)"
        )
