"""adanorm: the norm family of Xu et al., "Understanding and Improving Layer Normalization"
(NeurIPS 2019) as exact, drop-in PyTorch layers, with a registry and a model converter."""

from . import functional
from .convert import ConvertedNorm, convert_norms
from .functional import backend_info
from .modules import AdaNorm, DetachNorm, LayerNorm, LayerNormSimple, NoNorm
from .registry import available_norms, get_norm, make_norm, register_norm

__version__ = "0.1.0"

__all__ = [
    "LayerNorm",
    "LayerNormSimple",
    "DetachNorm",
    "AdaNorm",
    "NoNorm",
    "functional",
    "make_norm",
    "get_norm",
    "register_norm",
    "available_norms",
    "convert_norms",
    "ConvertedNorm",
    "backend_info",
    "__version__",
]
