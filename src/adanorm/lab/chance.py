"""Which runs learned nothing from their inputs: their best validation metric against chance.

A run can finish with a finite loss and a number in every table and still have learned nothing:
a character LM that settles on the train split's character frequencies, a classifier that always
answers the majority class.  Each task's :meth:`~adanorm.lab.task.Task.chance_level` gives the
validation metric of the best input-ignoring predictor fitted on the train split of the run's own
data; :func:`check_chance` compares every run's best validation metric with it.

The rule (:data:`CHANCE_RULE`): a run is *at chance* when its best validation metric beats the
chance level by less than :data:`CHANCE_MARGIN` (1 %) of the chance level's value.  The chance level
is computed from the data, so it needs the data root (``data_dir``, else ``$ADANORM_DATA``); a
column whose data is missing, or whose task defines no chance level, is reported as not checked,
with the reason, never as passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from .config import flatten_config, resolve
from .runs import canonical_value
from .task import ChanceLevel, available_tasks, get_task

__all__ = ["CHANCE_MARGIN", "CHANCE_RULE", "ChanceCheck", "check_chance", "is_at_chance"]

CHANCE_MARGIN = 0.01

CHANCE_RULE = (
    "Chance level: the validation metric of the best predictor that ignores its input, fitted on "
    "the train split of the run's data (the predictor is named per column). A run is **at "
    f"chance** when its best validation metric beats the chance level by less than "
    f"{CHANCE_MARGIN:.0%} of the chance level's value: it learned nothing from its inputs, however "
    "finite its loss. Such runs stay in the tables (dropping them would pick seeds); their "
    "cells, and every comparison that includes them, are marked ⚠."
)


@dataclass(frozen=True)
class ChanceCheck:
    """One run against its chance level: ``level`` is None (and ``reason`` says why) when the
    run could not be checked."""

    run_dir: str
    level: ChanceLevel | None
    valid: float | None
    at_chance: bool
    reason: str = ""


def is_at_chance(valid: float, chance: float, higher_is_better: bool) -> bool:
    """Whether ``valid`` beats ``chance`` by less than :data:`CHANCE_MARGIN` of ``|chance|``."""
    margin = CHANCE_MARGIN * abs(chance)
    return valid < chance + margin if higher_is_better else valid > chance - margin


def _memo_key(config: dict[str, Any]) -> str:
    # Runs of one column differ in the seed and the norm only, which no chance level depends on;
    # anything else that differs gets its own computation.
    model = {k: v for k, v in (config.get("model") or {}).items() if k not in ("norm",
                                                                                 "norm_kwargs")}
    rest = {k: v for k, v in config.items() if k not in ("seed", "model")}
    return json.dumps(canonical_value({**rest, "model": model}), sort_keys=True)


def _compute(config: dict[str, Any], data_dir: str | None) -> ChanceLevel | str:
    name = str(config.get("task"))
    if name not in available_tasks():
        return f"task {name!r} is not registered here, so its chance level is unknown"
    try:
        level = get_task(name)(config, data_dir).chance_level()
    except FileNotFoundError as exc:  # DataMissingError, or a file a recipe reads directly
        return f"the data is missing ({exc}); set ADANORM_DATA or pass the data root"
    if level is None:
        return f"task {name!r} defines no chance level"
    return level


def _level(config: dict[str, Any], data_dir: str | None) -> ChanceLevel | str:
    """The chance level of ``config``'s data, or the reason there is none.  A config written
    before the task had some key is completed with today's defaults, and the predictor's text
    names the data and model keys so taken."""
    try:
        return _compute(config, data_dir)
    except KeyError as missing:
        try:
            filled = resolve(config)
            level = _compute(filled, data_dir)
        except (KeyError, ValueError) as exc:  # ConfigError is a ValueError
            detail = " ".join(str(exc).split())
            return (
                f"its config.yaml lacks the key {missing} that the task needs now, and today's "
                f"defaults do not complete it ({detail})"
            )
    added = sorted(
        key
        for key in set(flatten_config(filled)) - set(flatten_config(config))
        if key.partition(".")[0] in ("data", "model")
    )
    if isinstance(level, ChanceLevel) and added:
        level = replace(
            level, predictor=f"{level.predictor}; keys absent from the run's config.yaml taken "
            f"at today's defaults: {', '.join(added)}"
        )
    return level


def check_chance(runs: Iterable[dict[str, Any]], data_dir: str | None = None) -> list[ChanceCheck]:
    """One :class:`ChanceCheck` per run (each a ``results.json`` dict with its ``config`` and
    ``run_dir``, as :func:`~adanorm.lab.runs.collect_runs` returns them)."""
    memo: dict[str, ChanceLevel | str] = {}
    checks = []
    for run in runs:
        config = run["config"]
        key = _memo_key(config)
        if key not in memo:
            memo[key] = _level(config, data_dir)
        level = memo[key]
        if isinstance(level, str):
            checks.append(ChanceCheck(run["run_dir"], None, None, False, level))
            continue
        if level.metric != run["valid_metric"]:
            reason = (
                f"the chance level is in {level.metric!r} but the run selected on "
                f"{run['valid_metric']!r}"
            )
            checks.append(ChanceCheck(run["run_dir"], None, None, False, reason))
            continue
        if run.get("valid_mode") not in ("max", "min"):
            reason = f"its results.json gives valid_mode {run.get('valid_mode')!r}, not max or min"
            checks.append(ChanceCheck(run["run_dir"], None, None, False, reason))
            continue
        valid = float(run["valid"][run["valid_metric"]])
        higher = run["valid_mode"] == "max"
        checks.append(
            ChanceCheck(run["run_dir"], level, valid, is_at_chance(valid, level.value, higher))
        )
    return checks
