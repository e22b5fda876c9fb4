"""Experiment configs: YAML presets per task plus dotted command-line overrides.

A config is a plain nested ``dict`` (YAML in, YAML out), so it is trivially saved next to every run
and compared between runs.  Presets ship inside the package,
in ``src/adanorm/lab/presets/<task>/<preset>.yaml``.  Every key is declared
once with its type, range and default: the engine's in :data:`ENGINE_SCHEMA`, a task's ``data``,
``model`` and ``generation`` keys in its ``config_schema`` (a ``TaskSchema``).
:func:`resolve` checks a preset plus overrides against both and fills in the defaults, so a typo in
a preset or an override (``optim.lrr=1``, ``model: {nrom: adanorm}``) is a one-line error instead of
a silently ignored key, before any data is read or any file written.  :func:`check_resume` refuses
to continue a run with a config other than the one it was started with.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .schedules import SCHEDULES
from .schema import (
    Bool,
    ConfigError,
    EpochOrInt,
    Float,
    FloatList,
    Int,
    Kwargs,
    Str,
    TaskSchema,
    check_section,
)

__all__ = [
    "ConfigError",
    "ENGINE_DEFAULTS",
    "ENGINE_SCHEMA",
    "MAX_THREADS",
    "resolve",
    "task_schema",
    "canonical_norm",
    "resume_changes",
    "check_resume",
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


# Every key the generic engine reads: its type, range and default.  Tasks declare the keys they
# add under ``data`` and ``model`` (and their ``generation`` section) in their ``config_schema``
# (:class:`~adanorm.lab.schema.TaskSchema`); any other key is an error, except below a key whose
# name ends in ``_kwargs`` (free-form keyword arguments, e.g. a norm's).
#: Intra-op threads accepted by ``train.threads``: a bound independent of the machine (so a
#: config valid here is valid on a bigger one) that keeps far from OpenMP's own limits
#: (``--threads 100000`` crashes the process).
MAX_THREADS = max(256, os.cpu_count() or 1)
#: Seeds are fed to numpy, which takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1

ENGINE_SCHEMA: dict[str, Any] = {
    "task": Str(None, "the task name (set from the command line)", nullable=True),
    "seed": Int(1, low=0, high=MAX_SEED),
    "data": {
        "name": Str(None, 'the dataset key reported in tables, e.g. "mnist", "rt"', nullable=True),
        "batch_size": Int(32, "the *global* batch: split evenly over DDP processes", low=1),
        "eval_batch_size": Int(256, low=1),
        "max_examples": Int(0, ">0: keep only the first N examples of every split", low=0),
    },
    "model": {
        "norm": Str("layernorm", "a registered norm name or alias (adanorm.available_norms())"),
        "norm_kwargs": Kwargs("keyword arguments of the norm, e.g. {scale: 2} for AdaNorm's C"),
    },
    "optim": {
        "name": Str("adam", choices=("adam", "adamw", "sgd")),
        "lr": Float(1e-3, low=0.0),
        "weight_decay": Float(0.0, low=0.0),
        "betas": FloatList([0.9, 0.999], length=2, low=0.0, high=1.0, high_open=True),
        "eps": Float(1e-8, low=0.0, low_open=True),
        "momentum": Float(0.9, "sgd only", low=0.0, high=1.0),
        "clip_norm": Float(0.0, "0 disables gradient clipping", low=0.0),
        "accum_steps": Int(1, "micro-batches per optimizer update", low=1),
    },
    "schedule": {
        "name": Str("constant", choices=SCHEDULES),
        "warmup_steps": Int(0, low=0),
        "warmup_init_lr": Float(0.0, "lr at step 0 of the warm-up (fairseq's)", low=0.0),
        "min_lr": Float(0.0, "floor for linear and cosine decay", low=0.0),
    },
    "train": {
        "max_epochs": Int(1, low=0),
        "max_steps": Int(0, "0: no step limit; else stop after this many updates", low=0),
        "eval_every": EpochOrInt("epoch", '"epoch" or a number of optimizer updates'),
        "log_every": Int(50, "optimizer updates between train-loss lines", low=1),
        "checkpoint_every": Int(500, "updates between checkpoints (and at every eval)", low=1),
        "patience": Int(0, "evaluations without improvement before stopping; 0 disables", low=0),
        "amp": Str("none", choices=("none", "bf16", "fp16")),
        "device": Str("auto", "auto | cpu | cuda | cuda:N"),
        "threads": Int(1, "torch intra-op threads per process (0 means 1)", low=0,
                       high=MAX_THREADS),
        # >0: the final model is the average of the weights at the last N evaluations (fairseq's
        # average_checkpoints.py over the last N saved checkpoints) instead of the best one.
        "average_checkpoints": Int(0, low=0),
        "progress": Bool(True),
        "deterministic": Bool(True),
    },
    # Decoding settings of generation tasks, declared by their TaskSchema (mt: beam, lenpen,
    # max_len_a, max_len_b); empty for the others.
    "generation": {},
    "analysis": {
        # Record Theorem-1 gradient statistics of every norm layer every N optimizer updates
        # (adanorm.analysis.GradientStatsRecorder) into metrics.jsonl; 0 disables.
        "gradstats_every": Int(0, low=0),
    },
}

#: The engine's defaults, derived from :data:`ENGINE_SCHEMA` (kept for backward compatibility).
ENGINE_DEFAULTS: dict[str, Any] = {
    key: (
        {k: copy.deepcopy(f.default) for k, f in spec.items()}
        if isinstance(spec, dict)
        else spec.default
    )
    for key, spec in ENGINE_SCHEMA.items()
}

_SECTIONS = tuple(k for k, v in ENGINE_SCHEMA.items() if isinstance(v, dict))
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
        raise ConfigError(
            f"override {text!r}: value {raw!r} is not valid YAML ({_yaml_problem(exc)})"
        ) from exc
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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message, as one line: the problem and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a repeated key (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: a YAML mapping "
                f"may set each key once"
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "a preset") -> dict[str, Any]:
    """The mapping in the YAML file ``path``; one-line :class:`ConfigError` if the file is not
    UTF-8 text, not valid YAML, empty, has a duplicate key or is not a mapping."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.start}); {what} must be a YAML mapping"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({_yaml_problem(exc)})") from exc
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); {what} must be a "
                          f"YAML mapping with at least task-specific data and model keys")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _known_task(task: Any) -> type:
    from .task import available_tasks, get_task

    known = available_tasks()
    if not isinstance(task, str) or task not in known:
        raise ConfigError(f"unknown task {task!r}; known tasks: {', '.join(known)}")
    return get_task(task)


def task_schema(task: str) -> TaskSchema:
    """The declared ``data``/``model``/``generation`` keys of ``task``."""
    cls = _known_task(task)
    schema = getattr(cls, "config_schema", None)
    if not isinstance(schema, TaskSchema):
        raise ConfigError(
            f"task {task!r} ({cls.__module__}.{cls.__qualname__}) declares no config_schema; "
            f"give it a class attribute config_schema = TaskSchema(data=..., model=...)"
        )
    return schema


def canonical_norm(name: Any, where: str = "model.norm") -> str:
    """The registered name of the norm ``name`` (an alias such as ``ln`` included)."""
    import adanorm

    if not isinstance(name, str):
        raise ConfigError(f"{where} must be a norm name, got {name!r}")
    try:
        factory = adanorm.get_norm(name)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: unknown norm {name!r}; known norms: {', '.join(adanorm.available_norms())} "
            f"(aliases such as ln, layer_norm, ada_norm also work)"
        ) from exc
    for registered in adanorm.available_norms():
        if adanorm.get_norm(registered) is factory:
            return registered
    return name.lower()


def _check_norm(model: dict[str, Any]) -> None:
    import adanorm

    model["norm"] = canonical_norm(model["norm"])
    # Build one small norm now, so misspelled keyword arguments fail before any data is read.
    try:
        adanorm.make_norm(model["norm"], 8, **model["norm_kwargs"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model.norm_kwargs={model['norm_kwargs']!r} do not fit norm {model['norm']!r}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def resolve(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``raw`` (a preset's mapping, naming its ``task``) with ``overrides`` applied, checked
    against the engine's and the task's declared schema, defaults filled in.

    Idempotent: resolving a resolved config returns an equal config.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    cfg = copy.deepcopy(dict(raw))
    for text in overrides:
        key, value = parse_override(text)
        set_path(cfg, key, value, strict=False)
    schema = task_schema(cfg.get("task"))
    for key in cfg:
        if key not in ENGINE_SCHEMA:
            raise ConfigError(
                f"unknown config key {key!r}; known top-level keys: {', '.join(ENGINE_SCHEMA)}"
            )
    task_fields = {"data": schema.data, "model": schema.model, "generation": schema.generation}
    out: dict[str, Any] = {}
    for dotted, reason in schema.refused.items():
        section, _, name = dotted.partition(".")
        if isinstance(cfg.get(section), Mapping) and name in cfg[section]:
            raise ConfigError(f"{dotted} is not a key of task {cfg.get('task')!r}: {reason}")
    for key, spec in ENGINE_SCHEMA.items():
        if isinstance(spec, dict):
            fields = {**spec, **task_fields.get(key, {})}
            for dotted in schema.refused:
                if dotted.partition(".")[0] == key:
                    fields.pop(dotted.partition(".")[2], None)
            out[key] = check_section(key, fields, cfg.get(key, {}))
        else:
            out[key] = spec.check(key, cfg[key]) if key in cfg else copy.deepcopy(spec.default)
    _check_cross_keys(out)
    return out


def _check_cross_keys(cfg: dict[str, Any]) -> None:
    train = cfg["train"]
    if train["max_epochs"] == 0 and train["max_steps"] == 0:
        raise ConfigError("set train.max_epochs or train.max_steps (both are 0)")
    if not _DEVICE.fullmatch(train["device"]):
        raise ConfigError(
            f"train.device must be auto, cpu, cuda or cuda:N, got {train['device']!r}"
        )
    _check_norm(cfg["model"])
    cls = _known_task(cfg["task"])
    if cfg["data"]["name"] is None:
        cfg["data"]["name"] = cfg["task"]
    datasets = getattr(cls, "datasets", ())
    if datasets and cfg["data"]["name"] not in datasets:
        raise ConfigError(
            f"task {cfg['task']!r} has no dataset {cfg['data']['name']!r}; choose data.name from "
            f"{', '.join(datasets)}"
        )


def check_task(cfg: Mapping[str, Any]) -> None:
    """Construct the task once (no data is read), so its checks across keys (e.g. textcls's
    ``cv10`` for rt only) fail now, as one line, instead of after a run directory exists."""
    cls = _known_task(cfg["task"])
    try:
        cls(cfg, None)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc


def load_config(task: str, preset: str = "cpu", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load the ``preset`` of ``task`` (see :func:`find_preset`), apply ``overrides``, validate.

    The task name in the file, if any, must agree with ``task``.
    """
    _known_task(task)
    path = find_preset(task, preset)
    raw = read_yaml_mapping(path)
    if raw.get("task", task) != task:
        raise ConfigError(f"{path} is a preset for task {raw['task']!r}, not {task!r}")
    overrides = list(overrides)
    try:
        cfg = resolve({**raw, "task": task}, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}{' with --set overrides' if overrides else ''}: {exc}") from exc
    check_task(cfg)
    return cfg


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)


# --- resume ---------------------------------------------------------------------------------------
#: Keys a resumed run may change: only the progress bar, which never touches a number.
_COSMETIC = ("train.progress",)
_LENGTH = ("train.max_steps", "train.max_epochs")


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``cfg`` as ``{"section.key": value}`` (``*_kwargs`` mappings kept whole)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not str(key).endswith("_kwargs"):
            flat.update(flatten_config(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _longer_or_equal(old: int, new: int) -> bool:
    # 0 means "no limit" for both keys: longer than any number.
    return new == 0 or (old != 0 and new >= old)


def resume_changes(
    saved: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    allow_longer: bool = True,
    ignore: Callable[[str], bool] | None = None,
) -> list[str]:
    """The keys that differ between the config a run was started with and ``new``, other than
    cosmetic keys, keys for which ``ignore(key)`` is true, and (with ``allow_longer``) a longer
    ``train.max_steps``/``max_epochs``; empty if resuming is safe."""
    old_flat, new_flat = flatten_config(saved), flatten_config(new)
    changed = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if old == value or key in _COSMETIC or (ignore is not None and ignore(key)):
            continue
        if allow_longer and key in _LENGTH and isinstance(old, int) and isinstance(value, int):
            if _longer_or_equal(old, value):
                continue
            changed.append(f"{key} {old!r} -> {value!r} (only a longer run may resume)")
            continue
        changed.append(f"{key} {old!r} -> {value!r}")
    return changed


def check_resume(saved_path: str | os.PathLike[str], cfg: Mapping[str, Any]) -> None:
    """Refuse to resume the run whose ``config.yaml`` is ``saved_path`` with ``cfg`` if anything
    but a longer run (or a cosmetic key) changed: the checkpoint was trained with the saved one."""
    raw = read_yaml_mapping(saved_path, "a run's config.yaml")
    try:
        saved = resolve(raw)
    except ConfigError as exc:
        raise ConfigError(f"{saved_path}: {exc}; cannot compare it for --resume") from exc
    changed = resume_changes(saved, resolve(cfg))
    if changed:
        raise ConfigError(
            f"cannot resume {Path(saved_path).parent}: the config differs from the one it was "
            f"started with ({saved_path}): {'; '.join(changed)}. Only a longer train.max_steps / "
            f"train.max_epochs may change; undo the change or use a new --run-dir"
        )
