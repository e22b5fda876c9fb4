"""An encoder-decoder Transformer whose every norm comes from ``make_norm``.

Read top to bottom: attention (with a key/value cache for incremental decoding), the two layer
types, the two stacks, the model.  It follows fairseq's ``transformer_iwslt_de_en`` as the paper's
released scripts run it (``docs/paper.md`` §3.1):

* sinusoidal positions, embeddings scaled by sqrt(d) and, with ``share_embeddings``, one matrix for
  the source embedding, the target embedding and the output projection (joined dictionary);
* pre-norm by default (``pre_norm=True``: ``x + f(norm(x))``) with a final norm after each stack,
  as ``--encoder-normalize-before --decoder-normalize-before``; ``pre_norm=False`` is the original
  post-norm ``norm(x + f(x))`` with no final norms;
* the initialisation of ``--init_method km``: attention projections keep PyTorch's Linear default
  (kaiming-uniform, a=sqrt(5)), FFN weights are Xavier-uniform with zero biases, embeddings
  N(0, d^-1/2) with the padding row zero;
* dropout after attention / FFN sublayers and on embeddings, attention dropout on the attention
  weights, activation dropout after the FFN's ReLU.

Every norm (per sublayer and final) is built by the ``make_norm`` callable, so a model built with
``norm=adanorm`` has 2 + 2 * n_enc + 3 * n_dec AdaNorm modules and no other norm — unlike the
authors' code, which passes its norm choice to 2 of the 32 (§2.3).

Decoder inputs follow fairseq: the target is ``y_1 .. y_n </s>`` and the decoder reads
``<s> y_1 .. y_n`` (``bos`` first), so generation starts from ``bos`` and ends at ``eos``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TransformerMT", "MultiheadAttention", "sinusoidal_positions", "Cache"]

# One dict per attention module: {"k": (B, H, S, Dh), "v": ..., } — filled during decoding.
Cache = dict[str, dict[str, Tensor]]


def sinusoidal_positions(length: int, dim: int, offset: int = 0) -> Tensor:
    """fairseq's sinusoidal table: sin on the first half of the channels, cos on the second."""
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    pos = torch.arange(offset, offset + length, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention over ``n_head`` heads, with an optional decoding cache.

    ``cache`` (a dict owned by the caller) makes the module incremental: self-attention appends
    this step's keys and values to the cached ones; with ``static_kv`` (encoder-decoder attention)
    the projected encoder keys and values are computed once and reused at every step.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.d_head, self.dropout = n_head, d_model // n_head, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.d_head).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        cache: dict[str, Tensor] | None = None,
        static_kv: bool = False,
    ) -> Tensor:
        q = self._heads(self.q_proj(query))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._heads(self.k_proj(key_value)), self._heads(self.v_proj(key_value))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        mask = None
        if key_padding_mask is not None:  # True at padding: those keys take no part
            mask = ~key_padding_mask[:, None, None, :]
        # With a cache the query is the newest position, which may see every cached key.
        is_causal = causal and cache is None and query.shape[1] > 1
        if is_causal and mask is not None:
            length = query.shape[1]
            causal_mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            mask, is_causal = mask & causal_mask, False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.activation_dropout = nn.Dropout(activation_dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(F.relu(self.fc1(x))))


class _Sublayers(nn.Module):
    """What both layer types share: self-attention, (for the decoder) cross-attention and the FFN,
    each with its norm, built in that order, and the residual wiring around each: pre-norm or
    post-norm."""

    def __init__(
        self, d_model: int, n_head: int, d_ffn: int, *, dropout: float, attention_dropout: float,
        activation_dropout: float, pre_norm: bool, make_norm: Callable[[int], nn.Module],
        cross_attention: bool,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = MultiheadAttention(d_model, n_head, attention_dropout)
        self.self_attn_norm = make_norm(d_model)
        if cross_attention:
            self.cross_attn = MultiheadAttention(d_model, n_head, attention_dropout)
            self.cross_attn_norm = make_norm(d_model)
        self.ffn = FeedForward(d_model, d_ffn, activation_dropout)
        self.ffn_norm = make_norm(d_model)
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))


class EncoderLayer(_Sublayers):
    def __init__(self, d_model: int, n_head: int, d_ffn: int, **kwargs: Any) -> None:
        super().__init__(d_model, n_head, d_ffn, cross_attention=False, **kwargs)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        x = self._residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(h, h, key_padding_mask=padding_mask),
        )
        return self._residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(_Sublayers):
    def __init__(self, d_model: int, n_head: int, d_ffn: int, **kwargs: Any) -> None:
        super().__init__(d_model, n_head, d_ffn, cross_attention=True, **kwargs)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        cache: Cache | None = None,
    ) -> Tensor:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache = cache.setdefault(f"{id(self)}.self", {})
            cross_cache = cache.setdefault(f"{id(self)}.cross", {})
        x = self._residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(h, h, causal=True, cache=self_cache),
        )
        x = self._residual(
            x, self.cross_attn_norm,
            lambda h: self.cross_attn(
                h, memory, key_padding_mask=memory_padding_mask, cache=cross_cache,
                static_kv=True,
            ),
        )
        return self._residual(x, self.ffn_norm, self.ffn)


class TransformerMT(nn.Module):
    """Encoder-decoder Transformer for translation; see the module docstring.

    Args:
        src_vocab / tgt_vocab: vocabulary sizes (equal when ``share_embeddings``).
        pad: the padding index (its embedding row is zero and never updated).
        make_norm: ``make_norm(d_model) -> nn.Module`` builds every norm of the model.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        pad: int,
        make_norm: Callable[[int], nn.Module],
        d_model: int = 512,
        d_ffn: int = 1024,
        n_head: int = 4,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dropout: float = 0.3,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        pre_norm: bool = True,
        share_embeddings: bool = True,
        max_positions: int = 1024,
    ) -> None:
        super().__init__()
        if share_embeddings and src_vocab != tgt_vocab:
            raise ValueError(
                f"share_embeddings needs one joined dictionary, got src_vocab={src_vocab} and "
                f"tgt_vocab={tgt_vocab}"
            )
        self.pad, self.d_model, self.pre_norm = pad, d_model, pre_norm
        self.max_positions = max_positions
        self.src_embed = self._embedding(src_vocab, d_model, pad)
        self.tgt_embed = self.src_embed if share_embeddings else self._embedding(
            tgt_vocab, d_model, pad
        )
        self.register_buffer(
            "positions", sinusoidal_positions(max_positions, d_model), persistent=False
        )
        layer_args: dict[str, Any] = {
            "dropout": dropout, "attention_dropout": attention_dropout,
            "activation_dropout": activation_dropout, "pre_norm": pre_norm,
            "make_norm": make_norm,
        }
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, n_head, d_ffn, **layer_args) for _ in range(enc_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, n_head, d_ffn, **layer_args) for _ in range(dec_layers)
        )
        # fairseq builds the final norms only with normalize_before.
        self.encoder_norm = make_norm(d_model) if pre_norm else nn.Identity()
        self.decoder_norm = make_norm(d_model) if pre_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _embedding(vocab: int, dim: int, pad: int) -> nn.Embedding:
        embedding = nn.Embedding(vocab, dim, padding_idx=pad)
        nn.init.normal_(embedding.weight, mean=0.0, std=dim**-0.5)
        with torch.no_grad():
            embedding.weight[pad].zero_()
        return embedding

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        length = tokens.shape[1]
        if offset + length > self.max_positions:
            raise ValueError(
                f"a sequence of {offset + length} tokens exceeds max_positions="
                f"{self.max_positions}"
            )
        x = embedding(tokens) * math.sqrt(self.d_model)
        x = x + self.positions[offset : offset + length].to(x.dtype)
        return self.dropout(x)

    # --- encoder --------------------------------------------------------------------------------
    def encode(self, src: Tensor, padded: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """``src`` (B, S) token ids ending in eos -> (memory (B, S, d), padding mask or None).

        ``padded`` says whether ``src`` holds any padding; a caller that counted its tokens on
        the host passes it, since finding out here makes the host wait for the device.
        """
        padding_mask = src.eq(self.pad)
        if padded is None:
            padded = bool(padding_mask.any())
        mask = padding_mask if padded else None
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    # --- decoder --------------------------------------------------------------------------------
    def _output(self, x: Tensor) -> Tensor:
        return F.linear(self.decoder_norm(x), self.tgt_embed.weight)

    def decode(self, prev_tokens: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        """Teacher forcing: ``prev_tokens`` (B, T) -> logits (B, T, V)."""
        x = self._embed(self.tgt_embed, prev_tokens)
        for layer in self.decoder_layers:
            x = layer(x, memory, memory_mask)
        return self._output(x)

    def decode_step(
        self,
        last_tokens: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        cache: Cache,
        step: int,
    ) -> Tensor:
        """Incremental decoding: the tokens at position ``step`` (B,) -> logits (B, V).

        ``cache`` holds every layer's keys and values of positions < ``step`` and is extended in
        place; :meth:`reorder_cache` follows beam-search reordering.
        """
        x = self._embed(self.tgt_embed, last_tokens[:, None], offset=step)
        for layer in self.decoder_layers:
            x = layer(x, memory, memory_mask, cache)
        return self._output(x)[:, 0]

    @staticmethod
    def reorder_cache(cache: Cache, order: Tensor) -> None:
        for entry in cache.values():
            for key, value in entry.items():
                entry[key] = value.index_select(0, order)

    def forward(self, src: Tensor, prev_tokens: Tensor, src_padded: bool | None = None) -> Tensor:
        memory, memory_mask = self.encode(src, src_padded)
        return self.decode(prev_tokens, memory, memory_mask)
