from __future__ import annotations

import math

import pytest

from adanorm.lab.schedules import lr_multiplier


def sched(name: str, **kw) -> dict:
    return {
        "name": name,
        "warmup_steps": kw.get("warmup", 10),
        "warmup_init_lr": kw.get("init", 0.0),
        "min_lr": kw.get("min_lr", 0.0),
    }


def test_warmup_is_linear_from_the_init_lr() -> None:
    f = lr_multiplier(sched("constant", init=1e-7), peak_lr=1e-3, total_steps=100)
    assert f(0) == pytest.approx(1e-4)
    assert f(5) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert f(10) == 1.0 and f(99) == 1.0


def test_inverse_sqrt_matches_fairseq() -> None:
    f = lr_multiplier(sched("inverse_sqrt", warmup=8000), peak_lr=1.5e-3, total_steps=90000)
    assert f(8000) == pytest.approx(1.0)
    assert f(32000) == pytest.approx(0.5)
    assert f(90000) == pytest.approx(math.sqrt(8000 / 90000))


def test_linear_and_cosine_decay_to_min_lr() -> None:
    lin = lr_multiplier(sched("linear", min_lr=1e-4), peak_lr=1e-3, total_steps=110)
    cos = lr_multiplier(sched("cosine", min_lr=1e-4), peak_lr=1e-3, total_steps=110)
    assert lin(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(35) > lin(35)  # cosine stays high longer
    assert lin(110) == pytest.approx(0.1) and cos(110) == pytest.approx(0.1)
    assert lin(500) == pytest.approx(0.1)


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="polynomial"):
        lr_multiplier(sched("polynomial"), 1e-3, 10)
