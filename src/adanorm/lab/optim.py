"""The optimizer named by the ``optim:`` section."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .config import ConfigError

__all__ = ["build_optimizer"]

_ADAM_FAMILY = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params: Iterable[Any], optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``optim.name`` (adam, adamw or sgd) over ``params`` with the section's settings."""
    name = optim_cfg["name"]
    if name in _ADAM_FAMILY:
        return _ADAM_FAMILY[name](
            params,
            lr=optim_cfg["lr"],
            betas=tuple(optim_cfg["betas"]),
            eps=optim_cfg["eps"],
            weight_decay=optim_cfg["weight_decay"],
        )
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim_cfg["lr"],
            momentum=optim_cfg["momentum"],
            weight_decay=optim_cfg["weight_decay"],
        )
    raise ConfigError(f"unknown optim.name {name!r}; choose adam, adamw or sgd")
