"""Transformer-XL (Dai et al., 2019) for character-level language modelling, top to bottom.

A readable re-implementation of the ``attn_type=0`` model of ``kimiyoung/transformer-xl``
(``pytorch/mem_transformer.py``: ``MemTransformerLM`` with ``RelPartialLearnableDecoderLayer``),
restricted to what a byte/character vocabulary needs (no adaptive softmax or embedding):

* relative positional encodings: sinusoids of the *distance* between query and key, projected per
  layer (``r_net``), with the two global biases ``r_w_bias`` (content) and ``r_r_bias`` (position)
  shared by all layers, exactly as the reference;
* segment-level recurrence: every layer also attends to ``mem_len`` cached hidden states of the
  previous segments (``mems``); the cache is detached, so no gradient flows into it;
* ``same_length``: every query attends to the same number of keys (used by the reference at
  evaluation time); ``clamp_len``: distances beyond it share one positional encoding.

Tensors are batch-first (``[batch, time, d_model]``), unlike the reference's time-first layout.
Every norm comes from the ``make_norm`` callable (the lab's :meth:`Task.make_norm`): post-norm as
in the reference (``norm(x + sublayer(x))``), or pre-norm (``x + sublayer(norm(x))`` plus a final
norm before the softmax) with ``pre_norm=True``.  Norm outputs are never modified in place, so full
backward hooks on the norms see the true gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["TransformerXL", "rel_shift", "attention_mask", "Mems"]

Mems = list[Tensor]  # one [batch, mem, d_model] tensor per layer (the layer's *input* states)
MakeNorm = Callable[[int], nn.Module]


def rel_shift(scores: Tensor) -> Tensor:
    """Turn scores indexed by (query i, distance column c) into (query i, key j).

    Column ``c`` of ``scores[..., i, :]`` holds the score for relative distance ``klen - 1 - c``.
    Query ``i`` (at absolute position ``mlen + i``) and key ``j`` are ``mlen + i - j`` apart, i.e.
    column ``c = j + qlen - 1 - i``.  The reference's pad-and-reshape trick shifts row ``i`` left
    by ``qlen - 1 - i`` without a gather; entries with ``j > mlen + i`` (the future) are garbage and
    must be masked by the caller.
    """
    *batch, qlen, klen = scores.shape
    zero_pad = scores.new_zeros(*batch, qlen, 1)
    padded = torch.cat([zero_pad, scores], dim=-1).view(*batch, klen + 1, qlen)
    return padded[..., 1:, :].reshape(*batch, qlen, klen)


def attention_mask(
    qlen: int, mlen: int, *, same_length: bool, mem_len: int, device: torch.device | None = None
) -> Tensor:
    """Boolean ``[qlen, mlen + qlen]`` mask, True where a query must *not* attend.

    Causal: query ``i`` sees the memory and keys up to itself.  With ``same_length`` the reference
    additionally hides the oldest keys so that every query sees exactly ``max(mem_len, klen -
    qlen)``-ish keys, i.e. the last query does not get more context than the first.
    """
    klen = mlen + qlen
    ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
    future = torch.triu(ones, diagonal=1 + mlen)
    if not same_length:
        return future
    mask_len = klen - mem_len
    mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
    too_old = torch.tril(ones, diagonal=-mask_shift_len)
    return future | too_old


class PositionalEmbedding(nn.Module):
    """Sinusoids of (clamped) distances, as the reference's ``PositionalEmbedding``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, distances: Tensor) -> Tensor:
        angles = torch.outer(distances, self.inv_freq)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [klen, d_model]


class RelMultiHeadAttention(nn.Module):
    """Attention with relative positions and memory (``RelPartialLearnableMultiHeadAttn``).

    score(i, j) = (q_i + r_w_bias)·k_j  [content]  +  (q_i + r_r_bias)·W_r R_{i-j}  [position],
    scaled by 1/sqrt(d_head).
    """

    def __init__(
        self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float,
        make_norm: MakeNorm, pre_norm: bool,
    ) -> None:
        super().__init__()
        self.n_head, self.d_head, self.pre_norm = n_head, d_head, pre_norm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.norm = make_norm(d_model)
        self.scale = 1.0 / math.sqrt(d_head)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, H*D] -> [B, H, T, D]
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.d_head).transpose(1, 2)

    def forward(
        self, x: Tensor, pos_emb: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, mask: Tensor,
        mem: Tensor | None,
    ) -> Tensor:
        qlen = x.shape[1]
        context = x if mem is None else torch.cat([mem, x], dim=1)  # [B, klen, d]
        # Pre-norm normalises the memory too, as the reference (it caches un-normalised states).
        qkv = self.qkv_net(self.norm(context) if self.pre_norm else context)
        q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
        q = q[:, :, -qlen:]  # queries only for the current segment
        r_k = self.r_net(pos_emb).view(-1, self.n_head, self.d_head).transpose(0, 1)  # [H, klen, D]

        content = (q + r_w_bias[:, None, :]) @ k.transpose(-1, -2)  # [B, H, qlen, klen]
        position = rel_shift((q + r_r_bias[:, None, :]) @ r_k.transpose(-1, -2))
        scores = (content + position) * self.scale
        scores = scores.float().masked_fill(mask, float("-inf"))
        probs = self.dropatt(torch.softmax(scores, dim=-1).type_as(v))
        attended = (probs @ v).transpose(1, 2).reshape(x.shape[0], qlen, -1)
        out = self.drop(self.o_net(attended))
        return x + out if self.pre_norm else self.norm(x + out)


class PositionwiseFF(nn.Module):
    """Linear → ReLU → dropout → Linear → dropout, with a residual and a norm."""

    def __init__(
        self, d_model: int, d_inner: int, dropout: float, make_norm: MakeNorm, pre_norm: bool
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.core = nn.Sequential(
            nn.Linear(d_model, d_inner),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(d_inner, d_model),
            nn.Dropout(dropout),
        )
        self.norm = make_norm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            return x + self.core(self.norm(x))
        return self.norm(x + self.core(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, d_model: int, n_head: int, d_head: int, d_inner: int, dropout: float,
        dropatt: float, make_norm: MakeNorm, pre_norm: bool,
    ) -> None:
        super().__init__()
        self.attn = RelMultiHeadAttention(
            d_model, n_head, d_head, dropout, dropatt, make_norm, pre_norm
        )
        self.ff = PositionwiseFF(d_model, d_inner, dropout, make_norm, pre_norm)

    def forward(
        self, x: Tensor, pos_emb: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, mask: Tensor,
        mem: Tensor | None,
    ) -> Tensor:
        return self.ff(self.attn(x, pos_emb, r_w_bias, r_r_bias, mask, mem))


class TransformerXL(nn.Module):
    """The language model: embedding × sqrt(d_model) → layers → tied softmax.

    ``mem_len``, ``clamp_len`` and ``same_length`` are the *training* settings; :meth:`forward`
    takes overrides so that evaluation can use the reference's longer memory without mutating the
    model.
    """

    def __init__(
        self, *, vocab_size: int, n_layer: int, d_model: int, n_head: int, d_head: int,
        d_inner: int, dropout: float, dropatt: float, make_norm: MakeNorm, pre_norm: bool = False,
        mem_len: int = 0, clamp_len: int = -1, same_length: bool = False, tie_weight: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_layer", n_layer),
                            ("d_model", d_model), ("n_head", n_head), ("d_head", d_head),
                            ("d_inner", d_inner)):
            if value <= 0:
                raise ValueError(f"TransformerXL: {name} must be positive, got {value}")
        if d_model % 2:
            raise ValueError(f"TransformerXL: d_model must be even (sinusoids), got {d_model}")
        self.d_model, self.n_layer, self.pre_norm = d_model, n_layer, pre_norm
        self.mem_len, self.clamp_len, self.same_length = mem_len, clamp_len, same_length

        self.word_emb = nn.Embedding(vocab_size, d_model)
        self.emb_scale = math.sqrt(d_model)
        self.pos_emb = PositionalEmbedding(d_model)
        self.drop = nn.Dropout(dropout)
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_head, d_head, d_inner, dropout, dropatt, make_norm, pre_norm)
            for _ in range(n_layer)
        )
        # Pre-norm leaves the residual stream un-normalised: normalise it once before the softmax
        # (the reference's pre_lnorm variant has no such norm; GPT-2-style pre-norm does).
        self.final_norm = make_norm(d_model) if pre_norm else nn.Identity()
        self.out = nn.Linear(d_model, vocab_size)
        if tie_weight:
            self.out.weight = self.word_emb.weight
        self._init(init_std)

    def _init(self, std: float) -> None:
        """The reference's ``weights_init`` (init='normal', std 0.02); the norms keep their own."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.r_w_bias, 0.0, std)
        nn.init.normal_(self.r_r_bias, 0.0, std)

    def forward(
        self, tokens: Tensor, mems: Mems | None = None, *, mem_len: int | None = None,
        clamp_len: int | None = None, same_length: bool | None = None,
    ) -> tuple[Tensor, Mems]:
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]`` and the memory for the next segment."""
        mem_len = self.mem_len if mem_len is None else mem_len
        clamp_len = self.clamp_len if clamp_len is None else clamp_len
        same_length = self.same_length if same_length is None else same_length
        qlen = tokens.shape[1]
        mlen = mems[0].shape[1] if mems else 0
        klen = mlen + qlen

        mask = attention_mask(qlen, mlen, same_length=same_length, mem_len=mem_len,
                              device=tokens.device)
        distances = torch.arange(klen - 1, -1, -1.0, device=tokens.device)
        if clamp_len > 0:
            distances = distances.clamp(max=clamp_len)
        pos_emb = self.drop(self.pos_emb(distances))

        hidden = self.drop(self.word_emb(tokens) * self.emb_scale)
        layer_inputs = []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(hidden)
            hidden = layer(hidden, pos_emb, self.r_w_bias, self.r_r_bias, mask,
                           mems[i] if mems else None)
        logits = self.out(self.drop(self.final_norm(hidden)))
        return logits, self._update_mems(layer_inputs, mems, mem_len)

    @staticmethod
    def _update_mems(layer_inputs: list[Tensor], mems: Mems | None, mem_len: int) -> Mems:
        """The last ``mem_len`` input states of every layer, detached (stop-gradient)."""
        if mem_len <= 0:
            return []
        with torch.no_grad():
            if not mems:
                return [h[:, -mem_len:].detach() for h in layer_inputs]
            return [torch.cat([m, h], dim=1)[:, -mem_len:].detach()
                    for m, h in zip(mems, layer_inputs, strict=True)]
