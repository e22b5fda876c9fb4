from __future__ import annotations

import pytest
from lab_helpers import REPO

from adanorm.lab.config import (
    ConfigError,
    apply_overrides,
    available_presets,
    load_config,
    parse_override,
)
from adanorm.lab.task import available_tasks, get_task


@pytest.mark.parametrize("task", ["mnist", "digits"])
@pytest.mark.parametrize("preset", ["paper", "cpu", "smoke"])
def test_every_preset_loads_and_names_its_task(task: str, preset: str) -> None:
    cfg = load_config(task, preset)
    assert cfg["task"] == task
    assert cfg["data"]["name"] == task
    assert cfg["model"]["norm"] == "layernorm"


def test_every_built_in_task_has_the_three_presets() -> None:
    # Tests may register throw-away tasks; only those shipped in adanorm.lab.tasks need presets.
    built_in = [
        t for t in available_tasks() if get_task(t).__module__.startswith("adanorm.lab.tasks")
    ]
    assert {"mnist", "digits"} <= set(built_in)
    for task in built_in:
        assert set(available_presets(task)) >= {"paper", "cpu", "smoke"}, task
        assert (REPO / "src/adanorm/lab/presets" / task).is_dir()


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert parse_override("model.channels=[8, 16]") == ("model.channels", [8, 16])
    assert parse_override("model.norm=adanorm") == ("model.norm", "adanorm")
    assert parse_override("train.eval_every=epoch") == ("train.eval_every", "epoch")
    assert parse_override("train.progress=false") == ("train.progress", False)


def test_overrides_apply_and_norm_kwargs_are_free_form() -> None:
    cfg = load_config(
        "mnist", "cpu", ["optim.lr=1e-3", "model.norm=adanorm", "model.norm_kwargs.scale=2"]
    )
    assert cfg["optim"]["lr"] == pytest.approx(1e-3)
    assert cfg["model"]["norm"] == "adanorm"
    assert cfg["model"]["norm_kwargs"] == {"scale": 2}


def test_unknown_override_key_is_an_error_naming_it() -> None:
    cfg = load_config("mnist", "smoke")
    with pytest.raises(ConfigError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(cfg, ["optim.lr"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.amp=fp8", "train.amp"),
        ("train.eval_every=0", "train.eval_every"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.accum_steps=0", "optim.accum_steps"),
        ("optim.lr=-1", "optim.lr"),
        ("seed=abc", "seed"),
    ],
)
def test_bad_values_are_rejected_with_their_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("digits", "smoke", [override])


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="cpu, paper, smoke"):
        load_config("mnist", "huge")
