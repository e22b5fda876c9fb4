"""Experiment configs: YAML presets per task plus dotted command-line overrides.

A config is a plain nested ``dict`` (YAML in, YAML out), so it is trivially saved next to every run
and compared between runs.  Presets ship inside the package, in
``src/adanorm/lab/presets/<task>/<preset>.yaml``; every preset is
validated against the engine's defaults (:data:`ENGINE_DEFAULTS`) merged under it, so a typo in a
preset or an override (``optim.lrr=1``) is an error instead of a silently ignored key.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ENGINE_DEFAULTS",
    "config_dirs",
    "PRESET_DIR",
    "find_preset",
    "load_config",
    "apply_overrides",
    "parse_override",
    "get_path",
    "set_path",
    "dump_yaml",
    "available_presets",
]


class ConfigError(ValueError):
    """A preset, an override or a config value is wrong; the message names it."""


# Every key the generic engine reads, with its default.  Tasks add their own keys under ``data``
# and ``model`` in their presets; keys are only accepted if a preset or these defaults declare them,
# except below a key whose name ends in ``_kwargs`` (free-form keyword arguments, e.g. a norm's).
ENGINE_DEFAULTS: dict[str, Any] = {
    "task": None,
    "seed": 1,
    "data": {
        "name": None,  # the dataset key reported in tables, e.g. "mnist", "rt", "sst5"
        "batch_size": 32,  # the *global* batch: split evenly over DDP processes
        "eval_batch_size": 256,
        "max_examples": 0,  # >0: keep only the first N examples of every split (smoke tests)
    },
    "model": {
        "norm": "layernorm",
        "norm_kwargs": {},
    },
    "optim": {
        "name": "adam",  # adam | adamw | sgd
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "momentum": 0.9,  # sgd only
        "clip_norm": 0.0,  # 0 disables gradient clipping
        "accum_steps": 1,  # micro-batches per optimizer update
    },
    "schedule": {
        "name": "constant",  # constant | linear | cosine | inverse_sqrt
        "warmup_steps": 0,
        "warmup_init_lr": 0.0,  # lr at step 0 of the warm-up, as fairseq's --warmup-init-lr
        "min_lr": 0.0,  # floor for linear and cosine decay
    },
    "train": {
        "max_epochs": 1,
        "max_steps": 0,  # 0: no step limit; otherwise stops after this many optimizer updates
        "eval_every": "epoch",  # "epoch" or a number of optimizer updates
        "log_every": 50,  # optimizer updates between train-loss lines in metrics.jsonl
        "checkpoint_every": 500,  # optimizer updates between checkpoints (and at every eval)
        "patience": 0,  # evaluations without improvement before stopping; 0 disables
        "amp": "none",  # none | bf16 | fp16 (fp16 on CUDA only)
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "threads": 1,  # torch intra-op threads per process
        # >0: the final model is the average of the weights at the last N evaluations (fairseq's
        # average_checkpoints.py over the last N saved checkpoints) instead of the best one.
        "average_checkpoints": 0,
        "progress": True,
        "deterministic": True,
    },
    # Decoding settings of generation tasks, declared by their presets (mt: beam, lenpen,
    # max_len_a, max_len_b); empty for the others.
    "generation": {},
    "analysis": {
        # Record Theorem-1 gradient statistics of every norm layer every N optimizer updates
        # (adanorm.analysis.GradientStatsRecorder) into metrics.jsonl; 0 disables.
        "gradstats_every": 0,
    },
}


#: The built-in presets: package data, so a wheel has them as well as a source checkout.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def config_dirs() -> list[Path]:
    """Where presets are searched: ``$ADANORM_CONFIGS`` (os.pathsep-separated directories laid
    out as ``<task>/<preset>.yaml``) first, then the presets shipped in the package."""
    dirs: list[Path] = []
    env = os.environ.get("ADANORM_CONFIGS")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(PRESET_DIR)
    return dirs


def available_presets(task: str) -> list[str]:
    names: set[str] = set()
    for d in config_dirs():
        if (d / task).is_dir():
            names.update(p.stem for p in (d / task).glob("*.yaml"))
    return sorted(names)


def find_preset(task: str, preset: str) -> Path:
    """The YAML file of ``preset`` for ``task``; ``preset`` may also be a path to a YAML file."""
    as_path = Path(preset)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise ConfigError(f"config file {str(as_path)!r} does not exist")
        return as_path
    for d in config_dirs():
        candidate = d / task / f"{preset}.yaml"
        if candidate.is_file():
            return candidate
    known = available_presets(task)
    raise ConfigError(
        f"no preset {preset!r} for task {task!r}; known presets: {', '.join(known) or 'none'} "
        f"(searched {', '.join(str(d / task) for d in config_dirs())})"
    )


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str, strict: bool) -> None:
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key in base and isinstance(base[key], dict) and isinstance(value, Mapping):
            free = str(key).endswith("_kwargs")
            _merge(base[key], value, path, strict and not free)
        else:
            if strict and key not in base and where in ("", "optim", "schedule", "train"):
                raise ConfigError(
                    f"unknown config key {path!r}; known keys here: {', '.join(sorted(base))}"
                )
            base[key] = copy.deepcopy(value)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({exc})") from exc
    # YAML 1.1 reads "1e-3" as a string; people mean a float.
    if isinstance(value, str) and any(c in value for c in ".eE"):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key, value


def get_path(cfg: Mapping[str, Any], dotted: str, default: Any = KeyError) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is KeyError:
                raise ConfigError(f"config has no key {dotted!r}")
            return default
        node = node[part]
    return node


def set_path(cfg: dict[str, Any], dotted: str, value: Any, *, strict: bool = True) -> None:
    """Set ``cfg[a][b][c] = value`` for ``"a.b.c"``.  With ``strict``, the key must already exist,
    unless it sits below a ``*_kwargs`` mapping (free-form keyword arguments)."""
    parts = dotted.split(".")
    node: Any = cfg
    free = False
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[:i])!r} is not a mapping")
        if part not in node:
            if strict and not free:
                raise ConfigError(
                    f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted!r}; "
                    f"known keys here: {', '.join(sorted(node))}"
                )
            node[part] = {}
        free = free or part.endswith("_kwargs")
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"cannot set {dotted!r}: its parent is not a mapping")
    last = parts[-1]
    if strict and not free and last not in node:
        raise ConfigError(
            f"unknown config key {dotted!r}; known keys here: {', '.join(sorted(node))}"
        )
    node[last] = value


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a copy of ``cfg``."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        key, value = parse_override(text)
        set_path(out, key, value)
    return out


def _validate(cfg: dict[str, Any]) -> None:
    train = cfg["train"]
    if train["amp"] not in ("none", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be none, bf16 or fp16, got {train['amp']!r}")
    ev = train["eval_every"]
    if not (ev == "epoch" or (isinstance(ev, int) and not isinstance(ev, bool) and ev > 0)):
        raise ConfigError(f"train.eval_every must be 'epoch' or a positive int, got {ev!r}")
    for key in ("max_epochs", "max_steps", "log_every", "checkpoint_every", "patience", "threads"):
        v = train[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"train.{key} must be a non-negative int, got {v!r}")
    if train["max_epochs"] == 0 and train["max_steps"] == 0:
        raise ConfigError("set train.max_epochs or train.max_steps (both are 0)")
    for key in ("batch_size", "eval_batch_size"):
        v = cfg["data"][key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"data.{key} must be a positive int, got {v!r}")
    accum = cfg["optim"]["accum_steps"]
    if not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"optim.accum_steps must be an int >= 1, got {accum!r}")
    for key in ("lr", "weight_decay", "clip_norm"):
        v = cfg["optim"][key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"optim.{key} must be a number >= 0, got {v!r}")
    if not isinstance(cfg["model"].get("norm_kwargs"), dict):
        raise ConfigError(
            f"model.norm_kwargs must be a mapping, got {cfg['model']['norm_kwargs']!r}"
        )
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise ConfigError(f"seed must be an int, got {cfg['seed']!r}")


def resolve(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Merge ``raw`` over the engine defaults, apply overrides and validate."""
    cfg = copy.deepcopy(ENGINE_DEFAULTS)
    _merge(cfg, raw, "", strict=True)
    cfg = apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def load_config(task: str, preset: str = "cpu", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load the ``preset`` of ``task`` (see :func:`find_preset`), apply ``overrides``, validate.

    The task name in the file, if any, must agree with ``task``.
    """
    path = find_preset(task, preset)
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping, got {type(raw).__name__}")
    if raw.get("task", task) != task:
        raise ConfigError(f"{path} is a preset for task {raw['task']!r}, not {task!r}")
    raw = {**raw, "task": task}
    cfg = resolve(raw, overrides)
    if cfg["data"]["name"] is None:
        cfg["data"]["name"] = task
    return cfg


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)
