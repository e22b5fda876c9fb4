r"""Measure, during real training, what the derivatives of μ and σ do to gradients (Theorem 1).

For every norm layer of a model, :class:`GradientStatsRecorder` records per-row statistics of the
gradient wrt the norm's output (g) and wrt its input (dx), on the steps you choose:

* ``mean_rel``: |mean(dx)| / rms(dx) per row, averaged over rows. Theorem 1: 0 when the derivative
  of μ is kept (LayerNorm-simple, detach-std, AdaNorm), and |ḡ|/rms(g) > 0 when μ is detached
  (detach-mean, DetachNorm).
* ``var_ratio``: Var(dx) / (Var(g)/σ²) per row, averaged. Theorem 1: ≤ 1 when the derivative of σ
  is kept (LayerNorm-simple, detach-mean), = 1 when it is detached (detach-std, DetachNorm).
  For AdaNorm the theorem's bound is Var(φ⊙g)/σ², so its ratio to Var(g)/σ² may exceed 1 when
  C > 1.
* ``grad_in_norm``, ``grad_out_norm``: Frobenius norms of dx and g.
* ``grad_in_mean``, ``grad_out_mean``: the row means of dx and g, averaged over rows.

σ is the norm's own σ (its ``eps`` and ``std_mode``).  "w/o Norm" layers record only the norms of
the gradients.  Hooks are attached only on recorded steps, so the other steps pay nothing.

Usage::

    recorder = GradientStatsRecorder(model, every=50)
    for step, batch in enumerate(loader):
        with recorder.step(step):
            loss = criterion(model(batch))
            loss.backward()
        metrics.update(recorder.pop())      # {} on steps that were not recorded

Full backward hooks are used, so a norm's output must not be modified in place (e.g. by
``nn.ReLU(inplace=True)``) on recorded steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .modules import NoNorm, NormBase

__all__ = ["GradientStatsRecorder", "norm_layers", "STAT_NAMES"]

STAT_NAMES = (
    "mean_rel",
    "var_ratio",
    "grad_in_norm",
    "grad_out_norm",
    "grad_in_mean",
    "grad_out_mean",
)
_TINY = 1e-30


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers of ``model`` (adanorm's and ``nn.LayerNorm``), in model order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (NormBase, NoNorm, nn.LayerNorm))
    ]


def _row_sigma(x2d: Tensor, module: nn.Module) -> Tensor:
    eps = float(getattr(module, "eps", 1e-5) or 0.0)
    if getattr(module, "std_mode", "biased") == "unbiased":
        return x2d.std(dim=-1) + eps
    return (x2d.var(dim=-1, unbiased=False) + eps).sqrt()


class _LayerAccumulator:
    """Running sums of the per-step statistics of one layer (device tensors until read)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, stats: dict[str, Tensor]) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: float(value) / self.count for key, value in self.sums.items()}


class GradientStatsRecorder:
    """Records Theorem-1 gradient statistics of every norm layer of ``model``.

    Args:
        model: the model to observe.
        every: record on steps where ``step % every == 0``.
        prefix: key prefix of the returned metrics.
    """

    def __init__(self, model: nn.Module, every: int = 1, prefix: str = "gradstats") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.layers = norm_layers(model)
        if not self.layers:
            raise ValueError("the model has no norm layer to observe")
        self.every = every
        self.prefix = prefix
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # A layer may run several times per step; backward meets those calls in reverse order.
        self._sigma: dict[str, list[Tensor]] = {}
        self._accumulators: dict[str, _LayerAccumulator] = {}

    # -- hooks ---------------------------------------------------------------------------------

    def _attach(self) -> None:
        for name, module in self.layers:
            self._handles.append(module.register_forward_pre_hook(self._forward_pre_hook(name)))
            self._handles.append(module.register_full_backward_hook(self._backward_hook(name)))

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sigma.clear()

    def _forward_pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, NoNorm) or not args or not torch.is_tensor(args[0]):
                return
            width = 1
            for d in module.normalized_shape:
                width *= d
            with torch.no_grad():
                x2d = args[0].detach().reshape(-1, width).float()
                self._sigma.setdefault(name, []).append(_row_sigma(x2d, module))

        return hook

    def _backward_hook(self, name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            grad_in, grad_out = grad_input[0], grad_output[0]
            if grad_in is None or grad_out is None:
                return
            width = grad_out.shape[-1] if isinstance(module, NoNorm) else None
            if width is None:
                width = 1
                for d in module.normalized_shape:
                    width *= d
            with torch.no_grad():
                dx = grad_in.detach().reshape(-1, width).float()
                g = grad_out.detach().reshape(-1, width).float()
                stats = {
                    "grad_in_norm": dx.norm(),
                    "grad_out_norm": g.norm(),
                    "grad_in_mean": dx.mean(),
                    "grad_out_mean": g.mean(),
                }
                pending = self._sigma.get(name)
                sigma = pending.pop() if pending else None
                if sigma is not None and dx.shape[0] > 0:
                    var_dx, mean_dx = torch.var_mean(dx, dim=-1, unbiased=False)
                    rms_dx = (var_dx + mean_dx.square()).sqrt()
                    stats["mean_rel"] = (mean_dx.abs() / rms_dx.clamp_min(_TINY)).mean()
                    var_g = g.var(dim=-1, unbiased=False)
                    bound = var_g / sigma.square()
                    keep = bound > 0
                    ratio = var_dx[keep] / bound[keep]
                    stats["var_ratio"] = ratio.mean() if ratio.numel() else dx.new_tensor(1.0)
                self._accumulators.setdefault(name, _LayerAccumulator()).add(stats)

        return hook

    # -- public API ----------------------------------------------------------------------------

    def should_record(self, step: int) -> bool:
        return step % self.every == 0

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[bool]:
        """Observe the forward and backward run inside the block, if ``step`` is a recorded one."""
        record = self.should_record(step)
        if record:
            self._attach()
        try:
            yield record
        finally:
            if record:
                self._detach_hooks()

    def pop(self) -> dict[str, float]:
        """The statistics recorded since the last call, as flat metrics:
        ``{prefix}/{layer}/{stat}`` per layer, and ``{prefix}/all/{stat}`` averaged over layers."""
        metrics: dict[str, float] = {}
        totals: dict[str, list[float]] = {}
        for name, _ in self.layers:
            acc = self._accumulators.get(name)
            if acc is None or acc.count == 0:
                continue
            for stat, value in acc.means().items():
                metrics[f"{self.prefix}/{name}/{stat}"] = value
                totals.setdefault(stat, []).append(value)
        for stat, values in totals.items():
            metrics[f"{self.prefix}/all/{stat}"] = sum(values) / len(values)
        self._accumulators.clear()
        return metrics

    def close(self) -> None:
        self._detach_hooks()
