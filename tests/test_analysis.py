"""The gradient-statistics recorder reproduces Theorem 1 on a small network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adanorm
from adanorm.analysis import GradientStatsRecorder, norm_layers


def _mlp(norm: str, depth: int = 3, width: int = 32, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), adanorm.make_norm(norm, width, **kwargs), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 5))


def _record(model: nn.Module, steps: int = 4, every: int = 1) -> list[dict[str, float]]:
    recorder = GradientStatsRecorder(model, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        x = torch.randn(16, 32, generator=gen) * 3 + 1
        y = torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        with recorder.step(step):
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        out.append(recorder.pop())
    return out


@pytest.mark.parametrize(
    "norm,mean_zero,ratio",
    [
        ("layernorm-simple", True, "le"),
        ("detach-mean", False, "le"),
        ("detach-std", True, "eq"),
        ("detachnorm", False, "eq"),
    ],
)
def test_theorem1_on_training(norm, mean_zero, ratio):
    metrics = _record(_mlp(norm))[-1]
    for name in ("1", "4", "7"):
        mean_rel = metrics[f"gradstats/{name}/mean_rel"]
        var_ratio = metrics[f"gradstats/{name}/var_ratio"]
        if mean_zero:
            assert mean_rel < 1e-4
        else:
            assert mean_rel > 1e-3
        if ratio == "eq":
            assert var_ratio == pytest.approx(1.0, rel=1e-4)
        else:
            assert var_ratio < 1.0
    assert metrics["gradstats/all/grad_in_norm"] > 0


def test_adanorm_recentres():
    metrics = _record(_mlp("adanorm", scale=2.0))[-1]
    assert metrics["gradstats/all/mean_rel"] < 1e-4


def test_records_only_on_chosen_steps_and_leaves_no_hooks():
    model = _mlp("layernorm")
    history = _record(model, steps=5, every=2)
    assert [bool(m) for m in history] == [True, False, True, False, True]
    assert all(not m._forward_pre_hooks and not m._backward_hooks for _, m in norm_layers(model))


def test_no_norm_records_gradient_norms_only():
    metrics = _record(_mlp("none"), steps=1)[0]
    assert "gradstats/1/grad_in_norm" in metrics
    assert "gradstats/1/var_ratio" not in metrics


def test_shared_layer_called_twice_per_step():
    torch.manual_seed(0)
    norm = adanorm.LayerNormSimple(8)
    lin = nn.Linear(8, 8)
    model = nn.ModuleDict({"norm": norm, "lin": lin})
    recorder = GradientStatsRecorder(model)
    x = torch.randn(4, 8)
    with recorder.step(0):
        out = norm(lin(norm(x * 5)))
        (out * torch.randn(4, 8)).sum().backward()
    metrics = recorder.pop()
    assert metrics["gradstats/norm/mean_rel"] < 1e-4
    assert metrics["gradstats/norm/var_ratio"] <= 1.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        GradientStatsRecorder(_mlp("layernorm"), every=0)
    with pytest.raises(ValueError, match="no norm layer"):
        GradientStatsRecorder(nn.Linear(2, 2))
