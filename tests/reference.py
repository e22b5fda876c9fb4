"""Independent float64 reference for the norm family: plain autograd, explicit ``.detach()``.

Deliberately written from the paper's formulas (paper.md §1), sharing no code with ``adanorm``.
"""

from __future__ import annotations

import math

from torch import Tensor


def reference_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    std_mode: str = "biased",
    detach_mean: bool = False,
    detach_std: bool = False,
    scale: float | None = None,
    k: float = 0.1,
) -> Tensor:
    """Returns a float64 tensor; gradients flow to ``x`` (and ``weight``/``bias``) as the paper
    prescribes for each variant."""
    dims = tuple(range(-len(normalized_shape), 0))
    x64 = x.double()
    mu = x64.mean(dim=dims, keepdim=True)
    if std_mode == "biased":
        sigma = ((x64 - mu) ** 2).mean(dim=dims, keepdim=True).add(eps).sqrt()
    else:
        width = math.prod(normalized_shape)
        var = ((x64 - mu) ** 2).sum(dim=dims, keepdim=True) / (width - 1)
        sigma = var.sqrt() + eps
    if detach_mean:
        mu = mu.detach()
    if detach_std:
        sigma = sigma.detach()
    y = (x64 - mu) / sigma
    if scale is not None:
        phi = (scale * (1 - k * y)).detach()
        return phi * y
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


VARIANTS = {
    # name: (functional kwargs for adanorm.functional.normalize / reference_norm, has affine)
    "layernorm": ({}, True),
    "layernorm-simple": ({}, False),
    "detachnorm": ({"detach_mean": True, "detach_std": True}, False),
    "detach-mean": ({"detach_mean": True}, False),
    "detach-std": ({"detach_std": True}, False),
    "adanorm": ({"scale": 2.0, "k": 0.1}, False),
}
