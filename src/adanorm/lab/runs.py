"""Finished runs read for a report: ``results.json``, ``config.yaml``, ``run.json`` and
``metrics.jsonl`` checked, and runs labelled by the config keys that tell their experiments apart
(:func:`label_settings`).  A malformed file is a :class:`ReportError` that names it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "IGNORED_KEYS",
    "pooled_key",
    "ReportError",
    "NoRunsError",
    "collect_runs",
    "replicate_id",
    "replicate_of",
    "config_identity",
    "label_settings",
    "read_metrics_checked",
    "canonical_value",
    "is_number",
]

# Config keys that cannot change what a run measures, so runs that differ only in them are pooled.
# Each one only says how a run is executed or bookkept, never what is trained, on which data, or
# how the reported checkpoint is selected:
# * seed: what we pool over;
# * train.threads: intra-op threads (only the floating-point summation order changes);
# * train.deterministic: deterministic kernels (same computation, at most run-to-run noise);
# * train.device: replaced by the device the run actually used, from run.json (see DEVICE_KEY);
# * train.progress, train.log_every: the progress bar and how often train loss is logged;
# * train.checkpoint_every: how often the last state is saved for resuming (never selects a
#   model: the best checkpoint is taken at every evaluation, set by train.eval_every, which counts);
# * data.download: whether a missing dataset may be fetched (a fetched file is checksum-verified);
# * data.<anything>_dir (data.raw_dir, data.cache_dir, data.ptb_dir, ...): where the data or its
#   preprocessing cache lives, not what it is.
# Output paths (the run directory) are not config keys.  The model's norm and its kwargs are the
# row label, not a column.  Everything else, including keys a task adds, splits columns.
IGNORED_KEYS = frozenset(
    {
        "seed",
        "train.threads",
        "train.deterministic",
        "train.device",
        "train.progress",
        "train.log_every",
        "train.checkpoint_every",
        "data.download",
    }
)
ROW_KEYS = frozenset({"model.norm", "model.norm_kwargs"})
# Under k-fold cross-validation (data.protocol cv10) each fold is a replicate of the experiment,
# like a seed: runs are pooled and paired over (fold, seed), never split into one column per fold.
FOLD_KEY = "data.cv_fold"
CV_PROTOCOLS = frozenset({"cv10"})
# The device type a run trained on (cpu, cuda), from run.json's environment.device: on CUDA,
# TF32 matmuls and different kernels change the numerics by more than summation order does.
DEVICE_KEY = "device"
# Keys that older runs lack, with the value that reproduces what those runs did.  Only keys whose
# absence is known to mean that value belong here; any other absent key splits columns as
# "(absent)".  train.average_checkpoints arrived in d189af7; before it the final model was always
# the best checkpoint, which is what 0 means.
LEGACY_DEFAULTS = {"train.average_checkpoints": 0}
ABSENT = "(absent)"



class ReportError(ValueError):
    """The runs cannot be reported as asked; the one-line message names the file or keys."""


class NoRunsError(ReportError, FileNotFoundError):
    """The directory does not exist or holds no finished run."""



def canonical_value(value: Any) -> Any:
    """A value with 1 and 1.0 made equal (YAML writes a float-valued int either way)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    return value


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        # *_kwargs are free-form keyword arguments: one value, as the config validates them.
        if isinstance(value, dict) and not str(key).endswith("_kwargs"):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = canonical_value(value)
    return flat


def pooled_key(key: str) -> bool:
    """Whether runs that differ in the flat config ``key`` (``"train.threads"``) still pool:
    :data:`IGNORED_KEYS` and every ``data.<anything>_dir``."""
    return key in IGNORED_KEYS or (key.startswith("data.") and key.endswith("_dir"))


def config_identity(config: dict[str, Any], device: str | None) -> dict[str, str]:
    """The flattened config keys that define the experiment (norm keys and ignored keys
    dropped, legacy defaults filled in, ``device`` added), each as canonical JSON text."""
    flat = _flatten(config)
    for key, value in LEGACY_DEFAULTS.items():
        flat.setdefault(key, value)
    if flat.get("data.protocol") in CV_PROTOCOLS:
        flat.pop(FOLD_KEY, None)  # a replicate key (see replicate_id), not part of the config
    identity = {
        key: json.dumps(value, sort_keys=True)
        for key, value in flat.items()
        if not pooled_key(key) and key not in ROW_KEYS
    }
    identity[DEVICE_KEY] = json.dumps(device if device is not None else ABSENT)
    return identity


def _read_json(path: Path, fix: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot be read ({exc}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); {fix}") from None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_results(result: Any, path: Path, fix: str) -> None:
    if not isinstance(result, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(result).__name__}; {fix}")
    for key in ("dataset", "norm", "norm_label", "test_metric"):
        if not isinstance(result.get(key), str):
            raise ReportError(f"{path}: missing or non-string {key!r}; {fix}")
    if not isinstance(result.get("seed"), int) or isinstance(result.get("seed"), bool):
        raise ReportError(f"{path}: missing or non-integer 'seed'; {fix}")
    test = result.get("test")
    metric = result["test_metric"]
    if not isinstance(test, dict) or not is_number(test.get(metric)):
        raise ReportError(f"{path}: no number at test.{metric} (its test_metric); {fix}")


def _read_config(run_dir: Path, fix: str) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(
            f"{path} is missing: without the run's config it cannot be told apart from other "
            f"configs; {fix}"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ReportError(f"{path}: not a readable YAML config ({detail}); {fix}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a YAML mapping, got {type(config).__name__}; {fix}")
    return config


def _read_device(run_dir: Path, fix: str) -> str | None:
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    info = _read_json(path, fix)
    device = info.get("environment", {}).get("device") if isinstance(info, dict) else None
    if not isinstance(device, str):
        raise ReportError(f"{path}: no string at environment.device; {fix}")
    return device.partition(":")[0]  # cuda:1 and cuda:0 are the same kind of device


def replicate_of(run: dict[str, Any]) -> int | str:
    """The replicate a collected run stands for (:func:`replicate_id`, else its seed)."""
    return run.get("replicate", int(run["seed"]))


def replicate_id(config: dict[str, Any], seed: int, path: Path, fix: str) -> int | str:
    """What a run replicates over: its seed, or under cross-validation ``fold<k>/seed<s>``.

    Runs of one config are pooled over replicates and paired across norms by them, so a
    cross-validated column pairs LayerNorm's fold 3 with AdaNorm's fold 3."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    if data.get("protocol") not in CV_PROTOCOLS:
        return seed
    fold = data.get(FOLD_KEY.partition(".")[2])
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise ReportError(
            f"{path}: protocol {data['protocol']} without an integer {FOLD_KEY}; {fix}"
        )
    return f"fold{fold}/seed{seed}"


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """All finished runs below ``root``: each ``results.json``, with ``run_dir``, its
    ``config`` (the run's ``config.yaml``) and ``config_identity`` (see :func:`config_identity`)
    added."""
    if not root.is_dir():
        raise NoRunsError(
            f"{root} is not a directory; give the directory that holds the runs (their "
            "results.json files)"
        )
    runs = []
    for path in sorted(root.rglob("results.json")):
        fix = f"re-run that run, or move {path.parent} out of {root}"
        result = _read_json(path, fix)
        _check_results(result, path, fix)
        config = _read_config(path.parent, fix)
        if config.get("seed") != result["seed"]:
            raise ReportError(
                f"{path}: seed {result['seed']} but its config.yaml says seed "
                f"{config.get('seed')!r}; {fix}"
            )
        result["run_dir"] = str(path.parent)
        result["config"] = config
        result["replicate"] = replicate_id(config, result["seed"], path, fix)
        result["config_identity"] = config_identity(config, _read_device(path.parent, fix))
        runs.append(result)
    return runs


def _show(value_json: str) -> str:
    value = json.loads(value_json)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def label_settings(runs: list[dict[str, Any]], refuse_mixed: bool = False) -> None:
    """Set each run's ``setting``: "" when every run of its dataset has the same config (apart
    from the seed, the norm and :data:`IGNORED_KEYS`), else the keys that differ between the
    dataset's configs with this run's values, e.g. ``train.max_steps=1000``.  With
    ``refuse_mixed``, a dataset with several configs is a :class:`ReportError` instead."""
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_dataset[run["dataset"]].append(run)
    for dataset, members in by_dataset.items():
        keys = sorted(set().union(*(run["config_identity"] for run in members)))
        differing = [
            key
            for key in keys
            if len({run["config_identity"].get(key, ABSENT) for run in members}) > 1
        ]
        if differing and refuse_mixed:
            first = members[0]
            other = next(
                run
                for run in members
                if any(
                    run["config_identity"].get(k, ABSENT) != first["config_identity"].get(k, ABSENT)
                    for k in differing
                )
            )
            raise ReportError(
                f"runs of {dataset} differ in config keys {', '.join(differing)} (e.g. "
                f"{first['run_dir']} vs {other['run_dir']}); report each config from its own "
                "directory, or drop --refuse-mixed to get one labelled column per config"
            )
        for run in members:
            run["setting"] = ", ".join(
                f"{key}={_show(run['config_identity'][key])}"
                if key in run["config_identity"]
                else f"{key}={ABSENT}"
                for key in differing
            )



def read_metrics_checked(path: Path, fix: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line that is not a JSON object, or a train/valid
    record without a numeric step and loss (what the plots read), is a :class:`ReportError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot be read ({exc}); {fix}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: line {number} is not valid JSON ({exc}); {fix}") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object; {fix}")
        if record.get("split") in ("train", "valid"):
            for key in ("step", "loss"):
                if not is_number(record.get(key)):
                    raise ReportError(
                        f"{path}: line {number} ({record['split']}) has no number at {key!r}; {fix}"
                    )
        records.append(record)
    return records
