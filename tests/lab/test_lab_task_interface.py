"""The Task interface every built-in task shares: one evaluation loop, told the split."""

from __future__ import annotations

import inspect

from adanorm.lab.task import Task, available_tasks, get_task

BUILT_IN = [t for t in available_tasks() if get_task(t).__module__.startswith("adanorm.lab.tasks")]


def test_every_built_in_task_evaluates_through_the_shared_loop() -> None:
    """No task copies the evaluation loop: what differs goes in eval_batch_stats."""
    assert {"digits", "lm", "mnist", "mt", "parsing", "textcls"} <= set(BUILT_IN)
    for name in BUILT_IN:
        assert get_task(name).evaluate is Task.evaluate, name


def test_collate_and_eval_batch_stats_are_told_the_split() -> None:
    for name in BUILT_IN:
        cls = get_task(name)
        for method in ("collate", "eval_batch_stats"):
            parameters = inspect.signature(getattr(cls, method)).parameters
            assert "split" in parameters, f"{name}.{method}{tuple(parameters)}"
