"""The sentence classifier: a Transformer encoder.

The model (:class:`TextTransformer`) is a Transformer encoder whose every norm comes from
``Task.make_norm``: two per layer, plus a final norm after the last layer in the pre-norm
arrangement (where the residual stream is otherwise never normalized).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ...config import ConfigError
from .data import PAD_ID

__all__ = ["TextTransformer", "EncoderLayer", "SelfAttention"]


# --- model --------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention written out with matmuls and a softmax.

    ``nn.MultiheadAttention`` with a padding mask dispatches to a CPU flash-attention kernel that,
    for these short sequences and small heads, took ~40% of a training step; plain matmuls are
    several times faster here and give the same function.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(batch, length, d_model)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """One Transformer encoder layer: self-attention and a ReLU feed-forward block, each with a
    residual connection and a norm, before the block (pre-norm) or after the residual sum
    (post-norm, as in Vaswani et al.)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        pre_norm: bool,
        make_norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = SelfAttention(d_model, num_heads, attention_dropout)
        self.attn_norm = make_norm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ffn_norm = make_norm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _attention(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        return self.dropout(self.self_attn(x, pad_mask))

    def _feed_forward(self, x: Tensor) -> Tensor:
        # torch.relu, not an in-place ReLU: norm outputs must stay intact for gradient analysis.
        return self.dropout(self.fc2(self.activation_dropout(torch.relu(self.fc1(x)))))

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self._attention(self.attn_norm(x), pad_mask)
            return x + self._feed_forward(self.ffn_norm(x))
        x = self.attn_norm(x + self._attention(x, pad_mask))
        return self.ffn_norm(x + self._feed_forward(x))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, ``num_layers`` encoder layers, (pre-norm: a final
    norm), mean pooling over real tokens or the ``<cls>`` position, dropout, a linear classifier.

    Input: ``(batch, length)`` token ids with ``<pad>`` = 0; output: ``(batch, classes)`` logits.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        make_norm: Callable[[int], nn.Module],
        *,
        d_model: int = 256,
        num_heads: int = 4,
        d_ff: int = 1024,
        num_layers: int = 4,
        max_len: int = 128,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        pre_norm: bool = True,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        for key, value in (
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("d_ff", d_ff),
            ("num_layers", num_layers),
            ("max_len", max_len),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be a positive int, got {value!r}")
        if d_model % num_heads:
            raise ConfigError(
                f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}"
            )
        for key, value in (
            ("dropout", dropout),
            ("attention_dropout", attention_dropout),
            ("activation_dropout", activation_dropout),
        ):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ConfigError(f"model.{key} must be in [0, 1), got {value!r}")
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"model.pooling must be 'mean' or 'cls', got {pooling!r}")
        if not isinstance(pre_norm, bool):
            raise ConfigError(f"model.pre_norm must be true or false, got {pre_norm!r}")
        self.pooling = pooling
        self.pre_norm = pre_norm
        self.embed_scale = math.sqrt(d_model)
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.embed_positions = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                d_model,
                num_heads,
                d_ff,
                dropout,
                attention_dropout,
                activation_dropout,
                pre_norm,
                make_norm,
            )
            for _ in range(num_layers)
        )
        # Pre-norm leaves the residual stream un-normalized after the last layer; the final norm
        # is one more norm slot (as in fairseq's --encoder-normalize-before).  Post-norm layers
        # already end with a norm.
        self.final_norm = make_norm(d_model) if pre_norm else None
        self.classifier = nn.Linear(d_model, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq's Transformer initialisation: N(0, d^-1/2) embeddings (padding row 0), Xavier
        # linear weights with zero biases.
        d_model = self.embed_tokens.embedding_dim
        nn.init.normal_(self.embed_tokens.weight, 0.0, d_model**-0.5)
        nn.init.normal_(self.embed_positions.weight, 0.0, d_model**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[PAD_ID].zero_()
        for layer in self.layers:
            for linear in (layer.self_attn.in_proj, layer.self_attn.out_proj, layer.fc1, layer.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(
                f"input length {tokens.shape[1]} exceeds model.max_len="
                f"{self.embed_positions.num_embeddings}"
            )
        pad_mask = tokens.eq(PAD_ID)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_scale * self.embed_tokens(tokens) + self.embed_positions(positions)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, pad_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            keep = (~pad_mask).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))
