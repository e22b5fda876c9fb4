"""What a newcomer sees: the first kernel build announced, a clean progress bar, readable files,
a self-explaining plot, plain --help text and a README that says where the data comes from."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_helpers import REPO, train

import adanorm._kernels as kernels
from adanorm.lab import cli
from adanorm.lab.plots import loss_curves_figure
from adanorm.lab.report import write_report


# --- the first C++ build --------------------------------------------------------------------------
def test_the_first_kernel_build_says_what_is_happening_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADANORM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ADANORM_DISABLE_EXTENSION", raising=False)
    monkeypatch.setattr(kernels, "_find_compiler", lambda: "c++")
    built = []

    def fake_build() -> None:  # what a build leaves in the cache
        built.append(1)
        kernels.build_directory().mkdir(parents=True, exist_ok=True)
        (kernels.build_directory() / "adanorm_cpu_0123456789ab.so").write_bytes(b"")

    monkeypatch.setattr(kernels, "_load_cpu_library", fake_build)
    monkeypatch.setattr(kernels, "_cpu_state", None)
    assert kernels.cpu_kernels_ready()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the C++ CPU kernels" in err and "once" in err
    assert str(kernels.build_directory()) in err
    monkeypatch.setattr(kernels, "_cpu_state", None)  # a new process: the library is cached
    assert kernels.cpu_kernels_ready()
    assert capsys.readouterr().err == ""
    assert len(built) == 2


# --- the progress bar -----------------------------------------------------------------------------
def test_the_progress_bar_shows_no_loss_before_the_first_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tqdm import tqdm

    postfixes: list[dict] = []
    monkeypatch.setattr(tqdm, "set_postfix", lambda self, post, **kw: postfixes.append(post))
    train(tmp_path / "r", "train.progress=true", "train.log_every=4")
    assert len(postfixes) == 24
    assert all("loss" not in post for post in postfixes[:3])
    assert all("nan" not in str(value) for post in postfixes for value in post.values())
    assert all("loss" in post for post in postfixes[3:])


# --- file modes -----------------------------------------------------------------------------------
@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.is_file()}


@pytest.mark.usefixtures("umask_022")
def test_run_files_and_reports_are_readable_by_others(tmp_path: Path) -> None:
    train(tmp_path / "runs" / "r")
    write_report(tmp_path / "runs", tmp_path / "report")
    modes = {**_modes(tmp_path / "runs" / "r"), **_modes(tmp_path / "report")}
    for name in ("config.yaml", "run.json", "metrics.jsonl", "results.json",
                 "checkpoint_last.pt", "checkpoint_best.pt", "report.md", "report.csv"):
        assert modes[name] == 0o644, (name, oct(modes[name]))


def test_file_modes_respect_a_private_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        train(tmp_path / "r")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "r")
    assert modes["results.json"] == 0o600 and modes["checkpoint_last.pt"] == 0o600


# --- the demo plot --------------------------------------------------------------------------------
def _records(offset: float) -> list[dict]:
    return [
        {"split": split, "step": step, "loss": 2.0 / step + offset}
        for step in (1, 2, 3)
        for split in ("train", "valid")
    ]


def test_the_loss_plot_has_one_legend_for_both_panels_that_explains_the_band() -> None:
    import matplotlib.pyplot as plt

    fig = loss_curves_figure(
        {"layernorm": [_records(0.0), _records(0.1)], "adanorm": [_records(0.2)]}, "digits"
    )
    try:
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels[:2] == ["LayerNorm (n=2)", "AdaNorm (n=1)"]
        assert any("band" in label and "seed" in label for label in labels)
    finally:
        plt.close(fig)


# --- adanorm --help -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv", [[], ["train"], ["sweep"], ["report"], ["demo"], ["download"], ["tasks"], ["analyze"]]
)
def test_help_has_no_rst_markup(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: adanorm")
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:"):
        assert markup not in text, (argv, markup)


# --- the README --------------------------------------------------------------------------------
def test_readme_says_where_the_data_comes_from() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    data = readme[readme.index("**The data.**") :].split("\n\n")[0]
    assert "../shared/data" in data and "fresh clone" in data
    assert "adanorm download" in data and "--data-dir" in data and "wheel" in data
