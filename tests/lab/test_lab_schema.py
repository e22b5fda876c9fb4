"""Strict configs (issue 16 items 2, 3 and 6): declared schemas, one-line errors before anything
is written, and resume / sweeps that refuse a changed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lab_helpers import REPO, read_jsonl, smoke_cfg, train

from adanorm.lab.cli import main
from adanorm.lab.config import (
    ConfigError,
    check_resume,
    dump_yaml,
    load_config,
    resolve,
    resume_changes,
)
from adanorm.lab.schema import NO_DEFAULT, TaskSchema
from adanorm.lab.sweep import plan_sweep, run_sweep
from adanorm.lab.task import available_tasks, get_task
from adanorm.lab.trainer import Trainer

BUILT_IN = [t for t in available_tasks() if get_task(t).__module__.startswith("adanorm.lab.tasks")]
PRESETS = REPO / "src" / "adanorm" / "lab" / "presets"
SMOKE = PRESETS / "digits" / "smoke.yaml"


def _preset(tmp_path: Path, text: str | bytes, name: str = "preset.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _smoke_with(tmp_path: Path, **sections: dict) -> str:
    """The digits smoke preset with ``sections`` merged in, as a preset file."""
    raw = yaml.safe_load(SMOKE.read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return _preset(tmp_path, yaml.safe_dump(raw))


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# --- item 2: one declared schema per task ---------------------------------------------------
@pytest.mark.parametrize("task", BUILT_IN)
def test_every_task_declares_its_schema_and_presets_get_all_its_defaults(task: str) -> None:
    schema = get_task(task).config_schema
    assert isinstance(schema, TaskSchema) and schema.model
    for preset in ("paper", "cpu", "smoke"):
        cfg = load_config(task, preset)
        for section in ("data", "model"):
            fields = getattr(schema, section)
            declared = {k for k, f in fields.items() if f.default is not NO_DEFAULT}
            assert declared <= set(cfg[section]), (task, preset, section)
        assert set(cfg["generation"]) <= set(schema.generation)


@pytest.mark.parametrize("task", BUILT_IN)
def test_schema_defaults_are_the_paper_presets_values(task: str) -> None:
    """A key left out of a preset gets the paper-scale value, not a scattered code default (the
    old textcls d_model 256 vs 32, mt dropout 0.3 vs 0.1 kind of mismatch)."""
    paper = yaml.safe_load((PRESETS / task / "paper.yaml").read_text())
    schema = get_task(task).config_schema
    for section in ("data", "model", "generation"):
        for key, spec in getattr(schema, section).items():
            # Exception: data.download defaults to false everywhere (no network unless asked),
            # though the lm paper preset asks for enwik8 to be fetched.
            if key == "download":
                assert spec.default is False
            elif key in paper.get(section, {}) and spec.default is not NO_DEFAULT:
                assert spec.default == paper[section][key], f"{task} {section}.{key}"


def test_a_minimal_preset_gets_the_schema_defaults(tmp_path: Path) -> None:
    path = _preset(tmp_path, "task: textcls\ndata: {name: rt}\n")
    cfg = load_config("textcls", path)
    assert cfg["model"]["d_model"] == 256 and cfg["model"]["dropout"] == 0.3
    assert cfg["data"]["protocol"] == "split" and cfg["data"]["min_freq"] == 1


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"model": {"nrom": "adanorm"}}, "unknown config key model.nrom; did you mean 'norm'"),
        ({"model": {"norm_kwargz": {"scale": 2}}}, "unknown config key model.norm_kwargz"),
        ({"data": {"batchsize": 8}}, "unknown config key data.batchsize"),
        ({"generation": {"beam": 4}}, "unknown config key generation.beam"),
        ({"train": {"average_checkpoints": -2}}, "train.average_checkpoints must be an int >= 0"),
        ({"analysis": {"gradstats_every": -1}}, "analysis.gradstats_every must be an int >= 0"),
        ({"optim": {"lr": float("nan")}}, "optim.lr must be a finite number >= 0, got nan"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must be a list of 2 finite numbers"),
        ({"model": {"dropout": 1.5}}, r"model.dropout must be a finite number in \[0, 1\)"),
        ({"model": {"channels": [4, 0]}}, "model.channels must be a non-empty list of ints >= 1"),
        ({"model": {"channels": "wide"}}, "model.channels must be a non-empty list"),
        ({"model": {"norm_kwargs": {"scale": float("inf")}}}, "model.norm_kwargs.scale must be"),
        ({"train": {"log_every": 0}}, "train.log_every must be an int >= 1"),
    ],
)
def test_typos_and_bad_values_in_a_preset_are_one_line_naming_the_key(
    tmp_path: Path, sections: dict, needle: str
) -> None:
    path = _smoke_with(tmp_path, **sections)
    with pytest.raises(ConfigError, match=needle) as info:
        load_config("digits", path)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_a_quoted_yes_is_not_a_bool(tmp_path: Path) -> None:
    path = _preset(tmp_path, 'task: mnist\ndata: {download: "yes"}\n')
    with pytest.raises(ConfigError, match="data.download must be true or false, got 'yes'"):
        load_config("mnist", path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a UTF-8 text file"),
        ("task: digits\nmodel: {norm: [\n", "invalid YAML"),
        ("task: digits\nseed: 1\nseed: 2\n", "duplicate key 'seed' at line 3"),
        ("task: digits\nmodel: {norm: ln, norm: adanorm}\n", "duplicate key 'norm'"),
        ("- a list\n", "must be a YAML mapping, got list"),
        ("task: digits\nseed: 100000000000000000000000\n", "seed must be an int in [0, 4294"),
        ("task: digits\nseed: -1\n", "seed must be an int"),
        ("task: digits\nmodel:\n", "model must be a mapping of keys, got None"),
        ("task: digits\nmodle: {}\n", "unknown config key 'modle'"),
    ],
)
def test_broken_preset_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, needle: str
) -> None:
    path = _preset(tmp_path, content)
    argv = ["train", "digits", "--preset", path, "--run-dir", str(tmp_path / "r")]
    err = _one_line_error(capsys, argv)
    assert needle in err
    assert path in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("train.average_checkpoints=-2", "train.average_checkpoints"),
        ("analysis.gradstats_every=-1", "analysis.gradstats_every"),
        ("train.progress=maybe", "train.progress must be true or false"),
        ("model.norm=nosuchnorm", "unknown norm 'nosuchnorm'"),
        ("model.norm_kwargs.scal=2", "do not fit norm 'layernorm'"),
        ("schedule.name=cosin", "schedule.name must be one of constant, linear, cosine"),
        ("optim.name=adamm", "optim.name must be one of adam, adamw, sgd"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
        ("data.name=mnist", "task 'digits' has no dataset 'mnist'"),
    ],
)
def test_bad_overrides_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, needle: str
) -> None:
    run_dir = tmp_path / "run"
    argv = ["train", "digits", "--preset", "smoke", "--set", override, "--run-dir", str(run_dir)]
    assert needle in _one_line_error(capsys, argv)
    assert not run_dir.exists()


# --- item 3: everything validated before data or files --------------------------------------------
def test_unknown_task_is_named_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["train", "nosuchtask"])
    assert "unknown task 'nosuchtask'; known tasks:" in err and "mnist" in err
    assert "preset" not in err
    with pytest.raises(ConfigError, match="unknown task 'nosuchtask'"):
        load_config("nosuchtask")


def test_huge_thread_count_is_refused_before_torch_sees_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "digits", "--preset", "smoke", "--threads", "100000"]
    err = _one_line_error(capsys, [*argv, "--run-dir", str(tmp_path / "r")])
    assert "train.threads must be an int in [0, " in err and "got 100000" in err
    assert not (tmp_path / "r").exists()


def test_task_checks_across_keys_fail_at_load_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "textcls", "--preset", "smoke", "--set", "data.name=sst5",
            "data.protocol=cv10", "--run-dir", str(tmp_path / "r")]
    assert "cv10 is for rt only" in _one_line_error(capsys, argv)
    assert not (tmp_path / "r").exists()


def test_the_trainer_validates_a_hand_edited_config_before_creating_the_run_dir(
    tmp_path: Path,
) -> None:
    cfg = smoke_cfg()
    cfg["model"]["nrom"] = "adanorm"
    with pytest.raises(ConfigError, match="model.nrom"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run").exists()


def test_norm_aliases_resolve_to_the_registered_name() -> None:
    assert load_config("digits", "smoke", ["model.norm=ln"])["model"]["norm"] == "layernorm"
    assert load_config("digits", "smoke", ["model.norm=Ada_Norm"])["model"]["norm"] == "adanorm"


def test_sweep_accepts_the_aliases_train_accepts(tmp_path: Path) -> None:
    runs = plan_sweep("digits", tmp_path, ["ln", "ada_norm", "none"], [1], scales=[2.0])
    assert [r.norm for r in runs] == ["layernorm", "adanorm", "none"]
    assert runs[1].run_dir == tmp_path / "digits" / "adanorm_C2" / "seed1"
    with pytest.raises(ConfigError, match="names the norm 'layernorm' twice"):
        plan_sweep("digits", tmp_path, ["ln", "layernorm"], [1])
    with pytest.raises(ConfigError, match="unknown norm 'lnn'"):
        plan_sweep("digits", tmp_path, ["lnn"], [1])


def test_sweep_validates_every_run_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    runs = plan_sweep("digits", out, ["layernorm", "adanorm"], [1])
    with pytest.raises(ConfigError, match="model.norm_kwargs"):
        # Only the AdaNorm run fails: every run is checked, not the first one alone.
        run_sweep("digits", out, runs, preset="smoke", overrides=["model.norm_kwargs.k=0.1"])
    assert not out.exists()


def test_a_fresh_start_replaces_a_stale_run_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"stale": True}))
    (run_dir / "config.yaml").write_text("stale: true\n")
    train(run_dir)
    assert "stale" not in json.loads((run_dir / "run.json").read_text())
    assert not (run_dir / "run.resumed.json").exists()


# --- item 6: resume with a changed config ------------------------------------------------------
class _Killed(Exception):
    pass


def _crashed_run(run_dir: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """A digits smoke run killed after update 11 (checkpoints every 4)."""
    original = Trainer._optimizer_step

    def crashing(self: Trainer, batches: list) -> None:
        original(self, batches)
        if self.state.step == 11:
            raise _Killed

    monkeypatch.setattr(Trainer, "_optimizer_step", crashing)
    with pytest.raises(_Killed):
        train(run_dir, *overrides)
    monkeypatch.setattr(Trainer, "_optimizer_step", original)


def test_resume_refuses_a_changed_config_and_keeps_the_saved_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _crashed_run(run_dir, monkeypatch)
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim.lr 0.01 -> 0.5; seed 1 -> 2") as info:
        train(run_dir, "optim.lr=0.5", "seed=2", resume=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train.max_steps 24 -> 16 .only a longer run"):
        train(run_dir, "train.max_steps=16", resume=True)
    assert (run_dir / "config.yaml").read_text() == saved
    # A longer run (and the progress bar) may change.
    results = train(run_dir, "train.max_steps=32", "train.progress=true", resume=True)
    assert results["best_step"] <= 32
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == 32


def test_resume_through_the_cli_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    _crashed_run(run_dir, monkeypatch)
    argv = ["train", "digits", "--preset", "smoke", "--run-dir", str(run_dir), "--resume",
            "--set", "model.norm=adanorm", "--no-progress"]
    err = _one_line_error(capsys, argv)
    assert "model.norm 'layernorm' -> 'adanorm'" in err and "cannot resume" in err


def test_resume_changes_lists_every_differing_key() -> None:
    old = load_config("digits", "smoke")
    new = load_config("digits", "smoke", ["optim.lr=0.5", "model.norm_kwargs.eps=0.001",
                                          "train.max_steps=30", "train.progress=true"])
    assert resume_changes(old, new) == [
        "model.norm_kwargs {} -> {'eps': 0.001}",
        "optim.lr 0.01 -> 0.5",
    ]
    longer = load_config("digits", "smoke", ["train.max_steps=100"])
    assert resume_changes(old, longer) == []
    assert resume_changes(longer, old) == [
        "train.max_steps 100 -> 24 (only a longer run may resume)"
    ]
    assert resume_changes(old, longer, allow_longer=False) == ["train.max_steps 24 -> 100"]
    # 0 means "no limit": longer than any number, and no number is longer than it.
    assert resume_changes({"train": {"max_steps": 10}}, {"train": {"max_steps": 0}}) == []
    assert resume_changes({"train": {"max_epochs": 0}}, {"train": {"max_epochs": 9}}) != []


def test_check_resume_fills_defaults_of_an_older_config_yaml(tmp_path: Path) -> None:
    cfg = load_config("digits", "smoke")
    older = {k: v for k, v in cfg.items() if k != "analysis"}  # written before the key existed
    (tmp_path / "config.yaml").write_text(dump_yaml(older))
    check_resume(tmp_path / "config.yaml", cfg)
    assert resolve(older) == resolve(cfg)


def test_sweep_refuses_a_preset_edited_mid_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    runs = plan_sweep("digits", out, ["layernorm"], [1, 2])
    started, finished = runs
    for run, lr in ((started, 0.02), (finished, 0.01)):
        run.run_dir.mkdir(parents=True)
        cfg = load_config("digits", "smoke", [f"optim.lr={lr}", *run.overrides()])
        (run.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with pytest.raises(ConfigError, match=r"seed1 was started with a different config .*optim.lr"):
        run_sweep("digits", out, runs, preset="smoke")
    # A finished run is not re-run: even a longer max_steps would mix two recipes in one table.
    (finished.run_dir / "results.json").write_text("{}")
    (started.run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"seed2 was finished with a different config .*max_st"):
        run_sweep("digits", out, runs, preset="smoke", overrides=["train.max_steps=48"])
    assert not (out / "sweep.json").exists()


def test_sweep_over_finished_runs_may_change_only_what_the_report_pools_over(
    tmp_path: Path,
) -> None:
    # A finished 1-thread run pools with 2-thread runs in the report (train.threads changes only
    # the summation order), so a later `--threads 2` sweep that skips it must not refuse; a key
    # the report splits on still refuses, and a started run is resumed only with its own threads.
    out = tmp_path / "sweep"
    finished, started = plan_sweep("digits", out, ["layernorm"], [1, 2])
    for run in (finished, started):
        run.run_dir.mkdir(parents=True)
        cfg = load_config("digits", "smoke", ["train.threads=1", *run.overrides()])
        (run.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (finished.run_dir / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"seed2 was started with a different config .*threads"):
        run_sweep("digits", out, [finished, started], preset="smoke",
                  overrides=["train.threads=2", "train.log_every=7"])
    assert not (out / "sweep.json").exists()
    attempted = run_sweep("digits", out, [finished], preset="smoke",
                          overrides=["train.threads=2", "train.log_every=7"])
    assert attempted == [] and (out / "sweep.json").exists()
    with pytest.raises(ConfigError, match=r"seed1 was finished with a different config .*optim.lr"):
        run_sweep("digits", out, [finished], preset="smoke",
                  overrides=["train.threads=2", "optim.lr=0.5"])
