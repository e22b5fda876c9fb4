r"""The norm family of Xu et al., "Understanding and Improving Layer Normalization" (NeurIPS 2019),
as drop-in modules with :class:`torch.nn.LayerNorm`'s conventions.

Each module normalizes the trailing dimensions given by ``normalized_shape`` over
:math:`H = \prod \text{normalized\_shape}` elements per row:

.. math::
    \mu = \frac{1}{H}\sum_i x_i, \qquad y = \frac{x - \mu}{\sigma}

with :math:`\sigma = \sqrt{\frac{1}{H}\sum_i (x_i-\mu)^2 + \epsilon}` (``std_mode="biased"``, the
default, as PyTorch and the paper) or :math:`\sigma = s + \epsilon`, :math:`s` the Bessel-corrected
standard deviation (``std_mode="unbiased"``, as the authors' released code).

NaN and inf propagate: a row that contains one yields NaN outputs and gradients for that row.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import functional as AF
from .functional import ShapeLike, StdMode

__all__ = ["LayerNorm", "LayerNormSimple", "DetachNorm", "AdaNorm", "NoNorm", "NormBase"]


def _normalized_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    shape = tuple(int(d) for d in normalized_shape)
    if len(shape) == 0 or any(d <= 0 for d in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty tuple of positive ints, "
            f"got {normalized_shape!r}"
        )
    return shape


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


class NormBase(nn.Module):
    """Shared constructor checks and repr for the family."""

    __constants__ = ["normalized_shape", "eps", "std_mode"]
    normalized_shape: tuple[int, ...]
    eps: float
    std_mode: str

    def __init__(
        self, normalized_shape: ShapeLike, eps: float = 1e-5, std_mode: StdMode = "biased"
    ):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = _check_eps(eps)
        AF.check_std_mode(std_mode)
        if std_mode == "unbiased" and math.prod(self.normalized_shape) < 2:
            raise ValueError(
                f"std_mode='unbiased' needs at least 2 normalized elements, got normalized_shape "
                f"{self.normalized_shape}"
            )
        self.std_mode = std_mode

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}"
        if self.std_mode != "biased":
            text += f", std_mode={self.std_mode!r}"
        return text


class LayerNorm(NormBase):
    r"""LayerNorm (paper Eq. 1): :math:`h = w \odot \frac{x-\mu}{\sigma} + b`.

    Same signature, parameters and state_dict as :class:`torch.nn.LayerNorm`, and numerically equal
    to it in the default ``std_mode="biased"``.

    Args:
        normalized_shape: trailing shape to normalize over (int or tuple).
        eps: added to the variance (biased) or to the std (unbiased). Default: 1e-5.
        elementwise_affine: learnable per-element gain ``weight`` (init 1). Default: True.
        bias: learnable per-element ``bias`` (init 0), if ``elementwise_affine``. Default: True.
        std_mode: ``"biased"`` or ``"unbiased"``.
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        std_mode: StdMode = "biased",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, std_mode)
        factory = {"device": device, "dtype": dtype}
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return AF.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, std_mode=self.std_mode
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class LayerNormSimple(NormBase):
    r"""LayerNorm-simple: :math:`z = (x-\mu)/\sigma`, no gain and no bias.

    The paper finds the gain and bias rarely help and tend to over-fit. No parameters: the
    state_dict is empty.
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        *,
        std_mode: StdMode = "biased",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, std_mode)

    def forward(self, input: Tensor) -> Tensor:
        return AF.layer_norm_simple(input, self.normalized_shape, self.eps, std_mode=self.std_mode)


class DetachNorm(NormBase):
    r"""DetachNorm: the forward of LayerNorm-simple, with :math:`\mu` and :math:`\sigma` treated as
    constants in backward (the paper's "copy function" :math:`\theta`).

    With both flags on (the paper's DetachNorm) :math:`\partial\ell/\partial x = g/\sigma`.
    One flag
    alone gives the paper's detach-mean-only or detach-std-only ablation (Theorem 1 (2), (3)).
    """

    __constants__ = NormBase.__constants__ + ["detach_mean", "detach_std"]

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        detach_mean: bool = True,
        detach_std: bool = True,
        *,
        std_mode: StdMode = "biased",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, std_mode)
        self.detach_mean = bool(detach_mean)
        self.detach_std = bool(detach_std)

    def forward(self, input: Tensor) -> Tensor:
        return AF.detach_norm(
            input,
            self.normalized_shape,
            self.eps,
            std_mode=self.std_mode,
            detach_mean=self.detach_mean,
            detach_std=self.detach_std,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", detach_mean={self.detach_mean}, detach_std={self.detach_std}"
        )


class AdaNorm(NormBase):
    r"""AdaNorm: :math:`z = C(1 - k y) \odot y`, :math:`y = (x-\mu)/\sigma`.

    :math:`\varphi(y) = C(1-ky)` is treated as a constant in backward (the paper's implementation
    note); :math:`\mu` and :math:`\sigma` are not, so the input gradient is LayerNorm-simple's
    backward applied to :math:`\varphi \odot g`.  The mean of :math:`\varphi` is :math:`C` and the
    row mean of :math:`z` is :math:`-Ck` (biased mode).  No parameters.

    Args:
        normalized_shape: trailing shape to normalize over.
        eps: see :class:`LayerNorm`. Default: 1e-5.
        scale: :math:`C > 0`. Default: 1.0 (the authors' README; their argparse default is 2.0).
        k: :math:`k > 0`; :math:`k = 1/10` keeps :math:`\varphi > 0` for >= 99% of elements by
            Chebyshev. Default: 0.1.
        std_mode: ``"biased"`` (paper) or ``"unbiased"`` (released code).
    """

    __constants__ = NormBase.__constants__ + ["scale", "k"]

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        scale: float = 1.0,
        k: float = 0.1,
        *,
        std_mode: StdMode = "biased",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, std_mode)
        scale, k = float(scale), float(k)
        if not scale > 0:
            raise ValueError(f"AdaNorm scale (C) must be > 0, got {scale}")
        if not k > 0:
            raise ValueError(f"AdaNorm k must be > 0, got {k}")
        self.scale = scale
        self.k = k

    def forward(self, input: Tensor) -> Tensor:
        return AF.ada_norm(
            input,
            self.normalized_shape,
            self.eps,
            scale=self.scale,
            k=self.k,
            std_mode=self.std_mode,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}, k={self.k}"


class NoNorm(nn.Module):
    """ "w/o Norm": the identity.  Takes (and checks) the same arguments as the other norms so that
    it can fill any norm slot; has no parameters."""

    __constants__ = ["normalized_shape"]

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        *,
        std_mode: StdMode = "biased",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        _check_eps(eps)
        AF.check_std_mode(std_mode)

    def forward(self, input: Tensor) -> Tensor:
        AF.check_input(input, self.normalized_shape)
        return input

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}"
