"""The transition parser's scorer: an MLP over the embeddings of the 48 features of :mod:`.data`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError
from . import transitions as arc_standard

__all__ = ["MLPParser"]


class MLPParser(nn.Module):
    """Embeddings of the 48 features -> [Linear -> norm -> activation -> dropout] per hidden layer
    -> Linear to transition scores.  Norms come from ``make_norm`` (the task's configured norm)."""

    def __init__(
        self,
        num_words: int,
        num_tags: int,
        num_label_features: int,
        num_transitions: int,
        make_norm: Callable[[int], nn.Module],
        *,
        word_dim: int = 50,
        tag_dim: int = 50,
        label_dim: int = 50,
        hidden_sizes: Sequence[int] = (200, 200),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden_sizes or any(int(h) <= 0 for h in hidden_sizes):
            raise ConfigError(f"model.hidden_sizes must be positive ints, got {hidden_sizes!r}")
        if activation not in ("relu", "cube"):
            raise ConfigError(f"model.activation must be 'relu' or 'cube', got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}")
        self.activation = activation
        self.word_embed = nn.Embedding(num_words, word_dim)
        self.tag_embed = nn.Embedding(num_tags, tag_dim)
        self.label_embed = nn.Embedding(num_label_features, label_dim)
        width = (
            arc_standard.NUM_WORD_FEATURES * word_dim
            + arc_standard.NUM_TAG_FEATURES * tag_dim
            + arc_standard.NUM_LABEL_FEATURES * label_dim
        )
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for size in hidden_sizes:
            self.linears.append(nn.Linear(width, int(size)))
            self.norms.append(make_norm(int(size)))
            width = int(size)
        self.dropout = nn.Dropout(dropout)  # never in place: norm outputs may carry hooks
        self.output = nn.Linear(width, num_transitions)

    def forward(self, features: Tensor) -> Tensor:
        w_end = arc_standard.NUM_WORD_FEATURES
        t_end = w_end + arc_standard.NUM_TAG_FEATURES
        x = torch.cat(
            [
                self.word_embed(features[:, :w_end]).flatten(1),
                self.tag_embed(features[:, w_end:t_end]).flatten(1),
                self.label_embed(features[:, t_end:]).flatten(1),
            ],
            dim=1,
        )
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = norm(linear(x))
            h = torch.relu(h) if self.activation == "relu" else h * h * h
            x = self.dropout(h)
        return self.output(x)
