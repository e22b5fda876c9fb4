"""What a non-editable install gets: the presets and every data file the package reads.

``.ci/run`` goes further: it installs the wheel in a fresh virtual environment outside the
checkout and trains from it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from lab_helpers import REPO

from adanorm.lab.config import PRESET_DIR, available_presets, config_dirs, find_preset
from adanorm.lab.task import available_tasks


def test_presets_are_searched_inside_the_package_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADANORM_CONFIGS", raising=False)
    package = Path(__import__("adanorm").__file__).resolve().parent
    assert config_dirs() == [PRESET_DIR]
    assert PRESET_DIR.is_relative_to(package)
    assert find_preset("mnist", "cpu") == PRESET_DIR / "mnist" / "cpu.yaml"


def test_adanorm_configs_directories_come_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "cpu.yaml").write_text("task: mnist\n")
    (tmp_path / "mnist" / "mine.yaml").write_text("task: mnist\n")
    monkeypatch.setenv("ADANORM_CONFIGS", str(tmp_path))
    assert find_preset("mnist", "cpu") == tmp_path / "mnist" / "cpu.yaml"
    assert {"mine", "cpu", "paper", "smoke"} <= set(available_presets("mnist"))


def test_the_wheel_ships_every_preset_and_data_file(tmp_path: Path) -> None:
    # Built without isolation (an isolated build would fetch setuptools: tests stay offline).
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: the build must not leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("adanorm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for task in available_tasks():
        if not (PRESET_DIR / task).is_dir():
            continue  # a throw-away task registered by another test
        for preset in ("paper", "cpu", "smoke"):
            assert f"adanorm/lab/presets/{task}/{preset}.yaml" in names, (task, preset)
    shipped = {
        str(path.relative_to(REPO / "src"))
        for path in (REPO / "src" / "adanorm").rglob("*")
        if path.is_file() and path.suffix != ".pyc" and "__pycache__" not in path.parts
    }
    # Modules included: the task families are subpackages (adanorm/lab/tasks/<family>/).
    assert shipped <= names, sorted(shipped - names)
