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

import torch
from torch import Tensor, nn

from . import _kernels
from . import functional as AF
from .functional import ShapeLike, StdMode

__all__ = ["LayerNorm", "LayerNormSimple", "DetachNorm", "AdaNorm", "NoNorm", "NormBase"]


# Attributes that define what a norm module computes: setting one drops the module's routes.
_CONFIG_ATTRIBUTES = frozenset(
    ("normalized_shape", "eps", "std_mode", "detach_mean", "detach_std", "scale", "k")
)
_NORM_OP = None  # adanorm::norm's C++ callable, once a route to it exists


def _norm_op():
    # OpOverload.__call__ only forwards to ._op, the C++ callable; calling that saves ~0.5 µs.
    op = torch.ops.adanorm.norm.default
    return getattr(op, "_op", op)


class NormBase(nn.Module):
    """Shared constructor checks (:func:`adanorm.functional.check_arguments`, the same ones the
    functional forms apply) and repr for the family.

    The parameter-free variants call the fused ``adanorm::norm`` op straight from ``forward``
    once the functional path has run for an input's (device, dtype): ``_routes`` caches the
    functional path's own backend choice per (is CUDA, dtype), and the constructor already
    validated the arguments, so a call costs one trailing-shape check and the op.  Setting any
    configuration attribute drops the cache; ``torch.compile``, tensor subclasses,
    ``ADANORM_DISABLE_EXTENSION`` and every other case take the functional path."""

    __constants__ = ["normalized_shape", "eps", "std_mode"]
    normalized_shape: tuple[int, ...]
    eps: float
    std_mode: str

    def __init__(
        self, normalized_shape: ShapeLike, eps: float = 1e-5, std_mode: StdMode = "biased"
    ) -> None:
        super().__init__()
        shape, _, eps, _, _, _ = AF.check_arguments(normalized_shape, eps, std_mode)
        self._routes: dict[tuple[bool, torch.dtype], tuple | None] = {}
        self.normalized_shape = shape
        self.eps = eps
        self.std_mode = std_mode

    def __setattr__(self, name: str, value: object) -> None:
        if name in _CONFIG_ATTRIBUTES:
            routes = self.__dict__.get("_routes")
            if routes:
                routes.clear()
        super().__setattr__(name, value)

    # The adanorm::norm arguments of this variant, and whether the functional form prefers the
    # fused kernel over native for plain LayerNorm-simple.
    def _op_arguments(self) -> _kernels.NormFlags:
        raise NotImplementedError

    _prefer_fused = False

    def _route(self, input: Tensor) -> tuple | None:
        """How inputs like ``input`` run: ``(on_cuda, op arguments)`` when through the fused op
        with no reshape beyond 2-D, else None (the functional path)."""
        if not (input.is_cuda or input.is_cpu):
            return None
        arguments = self._op_arguments()
        eps, unbiased, detach_mean, detach_std, scale, _ = arguments
        plain = not (unbiased or detach_mean or detach_std or scale is not None)
        backend, _ = AF.select_backend(
            "cuda" if input.is_cuda else "cpu", input.dtype, affine=False, plain=plain,
            prefer_fused=self._prefer_fused,
        )
        width = math.prod(self.normalized_shape)
        global _NORM_OP
        if backend == AF.CPP:
            _NORM_OP = _norm_op()
            return (False, arguments)
        if backend == AF.CUDA_CPP and _kernels.cuda_cpp_takes_all(width, input.element_size()):
            _NORM_OP = _norm_op()
            return (True, arguments)
        return None

    def _fused_forward(self, input: Tensor) -> Tensor | None:
        """The fused op on ``input`` when this module's cached route allows it, else None."""
        if torch.compiler.is_compiling() or type(input) is not Tensor:
            return None
        key = (input.is_cuda, input.dtype)
        route = self._routes.get(key, False)
        if route is False:
            # First call of this kind: the functional path validates, loads the kernels and
            # records the backend; later calls take the route decided here.
            self._routes[key] = self._route(input)
            return None
        if route is None or _kernels.extension_disabled():
            return None
        shape = self.normalized_shape
        size = input.shape
        on_cuda, arguments = route
        if len(shape) == 1:
            if not size or size[-1] != shape[0]:
                return None  # the functional path raises the error
            if on_cuda:
                if not _kernels._cuda_cpp_state:
                    return None
                return _NORM_OP(input, *arguments)
        elif size[len(size) - len(shape) :] != shape:
            return None
        if on_cuda and not _kernels._cuda_cpp_state:
            return None
        if input.dim() == 2 and len(shape) == 1:
            return _NORM_OP(input, *arguments)
        return _NORM_OP(input.reshape(-1, math.prod(shape)), *arguments).view_as(input)

    def forward(self, input: Tensor) -> Tensor:
        out = self._fused_forward(input)
        if out is not None:
            return out
        # The functional form of this variant (layer_norm_simple, detach_norm or ada_norm): the
        # same validation, backend choice and fallback, from the op arguments the module holds.
        flags = self._op_arguments()
        return AF._normalize(
            input, self.normalized_shape, None, None, self.eps, self.std_mode, flags.detach_mean,
            flags.detach_std, flags.scale, flags.k, flags.scale is not None, self._prefer_fused,
        )

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}"
        if self.std_mode != "biased":
            text += f", std_mode={self.std_mode!r}"
        return text


class LayerNorm(NormBase):
    r"""LayerNorm (paper Eq. 1) over the trailing ``normalized_shape`` dimensions:

    .. math::
        y = \frac{x - \mu}{\sigma} \odot w + b, \qquad \mu = \frac{1}{H}\sum_i x_i

    with :math:`\sigma = \sqrt{\frac{1}{H}\sum_i (x_i-\mu)^2 + \epsilon}` (``std_mode="biased"``)
    or :math:`\sigma = s + \epsilon`, :math:`s` the Bessel-corrected standard deviation
    (``std_mode="unbiased"``, the authors' released code).  Gradients flow through :math:`\mu`
    and :math:`\sigma`.

    Same signature, parameters and state_dict as :class:`torch.nn.LayerNorm`, and numerically equal
    to it in the default ``std_mode="biased"``.

    Args:
        normalized_shape (int or tuple): trailing shape to normalize over, :math:`H` elements.
        eps (float): added to the variance (biased) or to the std (unbiased). Default: 1e-5.
        elementwise_affine (bool): learnable per-element gain ``weight`` (init 1). Default: True.
        bias (bool): learnable per-element ``bias`` (init 0), if ``elementwise_affine``.
            Default: True.
        std_mode (str): ``"biased"`` or ``"unbiased"``. Default: ``"biased"``.
        device, dtype: of the parameters.

    Attributes:
        weight: the gain, of shape ``normalized_shape`` (None without ``elementwise_affine``).
        bias: the bias, of shape ``normalized_shape`` (None without bias).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`, any number of leading dimensions.
        - Output: :math:`(*, \text{normalized\_shape})`, the input's shape and dtype.

    Examples::

        >>> norm = adanorm.LayerNorm(512)
        >>> out = norm(torch.randn(8, 128, 512))
        >>> released = adanorm.LayerNorm(512, std_mode="unbiased")
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
    r"""LayerNorm-simple: LayerNorm without gain and bias,

    .. math::
        z = \frac{x - \mu}{\sigma}

    with :math:`\mu` and :math:`\sigma` as in :class:`LayerNorm`; gradients flow through both.
    The paper finds the gain and bias rarely help and tend to over-fit.  No parameters: the
    state_dict is empty.

    Args:
        normalized_shape (int or tuple): trailing shape to normalize over, :math:`H` elements.
        eps (float): added to the variance (biased) or to the std (unbiased). Default: 1e-5.
        std_mode (str): ``"biased"`` or ``"unbiased"``. Default: ``"biased"``.
        device, dtype: accepted for signature compatibility with :class:`torch.nn.LayerNorm`
            (there are no parameters to place).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`, any number of leading dimensions.
        - Output: :math:`(*, \text{normalized\_shape})`, the input's shape and dtype.

    Examples::

        >>> norm = adanorm.LayerNormSimple(512)
        >>> out = norm(torch.randn(8, 128, 512))
        >>> out.mean(-1).abs().max() < 1e-5
        tensor(True)
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

    _prefer_fused = True

    def _op_arguments(self) -> _kernels.NormFlags:
        return _kernels.NormFlags(self.eps, self.std_mode == "unbiased", False, False, None, 0.1)



class DetachNorm(NormBase):
    r"""DetachNorm: the forward of LayerNorm-simple, with :math:`\mu` and :math:`\sigma` treated as
    constants in backward (the paper's "copy function" :math:`\theta`):

    .. math::
        z = \frac{x - \theta(\mu)}{\theta(\sigma)}, \qquad
        \frac{\partial \ell}{\partial x} = \frac{g}{\sigma}
        \quad\text{(both detached)}

    One flag alone gives the paper's detach-mean-only
    (:math:`\partial\ell/\partial x = (g - y\,\mathrm{mean}(g \odot y))/\sigma`) or detach-std-only
    (:math:`(g - \mathrm{mean}(g))/\sigma`) ablation (Theorem 1 (2), (3)).  Second derivatives
    hold the detached statistics constant too.  No parameters.

    Args:
        normalized_shape (int or tuple): trailing shape to normalize over, :math:`H` elements.
        eps (float): added to the variance (biased) or to the std (unbiased). Default: 1e-5.
        detach_mean (bool): hold :math:`\mu` constant in backward. Default: True.
        detach_std (bool): hold :math:`\sigma` constant in backward. Default: True.
        std_mode (str): ``"biased"`` or ``"unbiased"``. Default: ``"biased"``.
        device, dtype: accepted for signature compatibility (no parameters).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`, any number of leading dimensions.
        - Output: :math:`(*, \text{normalized\_shape})`, the input's shape and dtype.

    Examples::

        >>> norm = adanorm.DetachNorm(512)                      # the paper's DetachNorm
        >>> ablation = adanorm.DetachNorm(512, detach_std=False)  # detach the mean only
        >>> out = norm(torch.randn(8, 128, 512, requires_grad=True))
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

    def _op_arguments(self) -> _kernels.NormFlags:
        return _kernels.NormFlags(
            self.eps, self.std_mode == "unbiased", self.detach_mean, self.detach_std, None, 0.1
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", detach_mean={self.detach_mean}, detach_std={self.detach_std}"
        )


class AdaNorm(NormBase):
    r"""AdaNorm (paper Eq. 9):

    .. math::
        z = \varphi(y) \odot y = C(1 - k y) \odot y, \qquad y = \frac{x - \mu}{\sigma}

    :math:`\varphi(y) = C(1-ky)` is treated as a constant in backward (the paper's implementation
    note); :math:`\mu` and :math:`\sigma` are not, so the input gradient is LayerNorm-simple's
    backward applied to :math:`\varphi \odot g`.  The mean of :math:`\varphi` is :math:`C` and the
    row mean of :math:`z` is :math:`-Ck` (biased mode).  No parameters.

    Args:
        normalized_shape (int or tuple): trailing shape to normalize over, :math:`H` elements.
        eps (float): see :class:`LayerNorm`. Default: 1e-5.
        scale (float): :math:`C`, finite and > 0. Default: 1.0 (the authors' README; their
            argparse default is 2.0).
        k (float): finite and > 0; :math:`k = 1/10` keeps :math:`\varphi > 0` for >= 99% of
            elements by Chebyshev. Default: 0.1.
        std_mode (str): ``"biased"`` (paper) or ``"unbiased"`` (released code).
            Default: ``"biased"``.
        device, dtype: accepted for signature compatibility (no parameters).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`, any number of leading dimensions.
        - Output: :math:`(*, \text{normalized\_shape})`, the input's shape and dtype.

    Examples::

        >>> norm = adanorm.AdaNorm(512, scale=2.0)      # C = 2, k = 0.1
        >>> out = norm(torch.randn(8, 128, 512))
        >>> released = adanorm.AdaNorm(512, scale=1.0, std_mode="unbiased")
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
        _, _, _, _, scale, k = AF.check_arguments(
            self.normalized_shape, self.eps, std_mode, scale, k, ada=True
        )
        self.scale = scale
        self.k = k

    def _op_arguments(self) -> _kernels.NormFlags:
        return _kernels.NormFlags(
            self.eps, self.std_mode == "unbiased", False, False, self.scale, self.k
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}, k={self.k}"


class NoNorm(nn.Module):
    r""""w/o Norm": the identity, :math:`z = x`, with :math:`\partial\ell/\partial x = g`.

    Takes (and checks, as every norm does) the same arguments as the other norms so that it can
    fill any norm slot, and checks that its input ends in ``normalized_shape``.  No parameters.

    Args:
        normalized_shape (int or tuple): the trailing shape its input must have.
        eps (float): checked and ignored. Default: 1e-5.
        std_mode (str): checked and ignored. Default: ``"biased"``.
        device, dtype: accepted for signature compatibility (no parameters).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`, any number of leading dimensions.
        - Output: :math:`(*, \text{normalized\_shape})`, the input's shape and dtype.

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), adanorm.NoNorm(64))
        >>> x = torch.randn(4, 64)
        >>> torch.equal(adanorm.NoNorm(64)(x), x)
        True
    """

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
        shape, _, _, _, _, _ = AF.check_arguments(normalized_shape, eps, std_mode)
        self.normalized_shape = shape

    def forward(self, input: Tensor) -> Tensor:
        AF.check_input(input, self.normalized_shape)
        return input

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}"
