"""Batched beam search with incremental decoding, following fairseq's ``SequenceGenerator``.

At every step each live sentence has ``beam`` hypotheses.  Their ``2 * beam`` best continuations
are ranked; an end-of-sentence continuation that ranks within the first ``beam`` is *finalized*
with the score ``sum log p / length ** lenpen`` (length counts the eos), and the best ``beam``
non-eos continuations go on.  A sentence is done once it has ``beam`` finalized hypotheses; done
sentences leave the batch (their rows of the encoder output and of the key/value cache are
dropped), so a batch costs what its longest translation costs, not ``batch * max_len``.  At
``max_len_a * src_len + max_len_b`` tokens eos is forced.

``greedy_search`` (beam 1 without the bookkeeping) is the plain reference the tests compare with,
together with an exhaustive rescoring check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .model import Cache, TransformerMT

__all__ = ["SearchConfig", "beam_search", "greedy_search", "sequence_log_prob"]


@dataclass(frozen=True)
class SearchConfig:
    beam: int = 5
    lenpen: float = 1.0  # fairseq's --lenpen: score / length ** lenpen
    max_len_a: float = 0.0  # max target length = a * source length + b (fairseq's defaults)
    max_len_b: int = 200
    min_len: int = 1

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if self.max_len_b < 1 and self.max_len_a <= 0:
            raise ValueError(
                f"max_len_a={self.max_len_a}, max_len_b={self.max_len_b} allow no target token"
            )


def _max_lengths(model: TransformerMT, src: Tensor, cfg: SearchConfig) -> Tensor:
    src_lens = src.ne(model.pad).sum(1)
    lengths = (cfg.max_len_a * src_lens.float() + cfg.max_len_b).long()
    return lengths.clamp(min=1, max=model.max_positions - 1)


def _step_log_probs(
    model: TransformerMT, tokens: Tensor, memory: Tensor, memory_mask: Tensor | None,
    cache: Cache, step: int, bos: int,
) -> Tensor:
    logits = model.decode_step(tokens, memory, memory_mask, cache, step)
    lprobs = F.log_softmax(logits.float(), dim=-1)
    lprobs[:, model.pad] = -torch.inf
    lprobs[:, bos] = -torch.inf
    return lprobs


@torch.no_grad()
def beam_search(
    model: TransformerMT, src: Tensor, *, bos: int, eos: int, cfg: SearchConfig = SearchConfig()
) -> list[list[int]]:
    """Translate ``src`` (B, S), padded with ``model.pad``; return the best hypothesis per
    sentence as token ids without bos/eos."""
    batch, beam = src.shape[0], cfg.beam
    device = src.device
    memory, memory_mask = model.encode(src)
    max_lens = _max_lengths(model, src, cfg)
    expand = torch.arange(batch, device=device).repeat_interleave(beam)
    memory = memory.index_select(0, expand)
    memory_mask = memory_mask.index_select(0, expand) if memory_mask is not None else None

    live = torch.arange(batch, device=device)  # original index of each live sentence
    tokens = torch.full((batch * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = -torch.inf  # all beams start identical: expand only the first at step 0
    finalized: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    cache: Cache = {}
    step = 0
    while live.numel():
        lprobs = _step_log_probs(model, tokens[:, -1], memory, memory_mask, cache, step, bos)
        vocab = lprobs.shape[1]
        if step < cfg.min_len:
            lprobs[:, eos] = -torch.inf
        at_max = (step + 1 >= max_lens[live]).repeat_interleave(beam)
        if bool(at_max.any()):
            forced = torch.full_like(lprobs[at_max], -torch.inf)
            forced[:, eos] = lprobs[at_max, eos].clamp(min=-1e9)  # eos is the only way out
            lprobs[at_max] = forced
        n_live = live.numel()
        candidates = (scores.view(-1, 1) + lprobs).view(n_live, beam * vocab)
        top_scores, top_index = candidates.topk(min(2 * beam, beam * vocab), dim=1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token.eq(eos) & torch.isfinite(top_scores)

        # Finalize eos continuations ranked within the first `beam` candidates.
        length = step + 1  # generated tokens including this eos
        finalize = is_eos[:, :beam].nonzero().tolist()
        for row, rank in finalize:
            sentence = int(live[row])
            if len(finalized[sentence]) >= beam:
                continue
            prefix_row = row * beam + int(top_beam[row, rank])
            hypothesis = tokens[prefix_row, 1:].tolist()
            normalized = float(top_scores[row, rank]) / length**cfg.lenpen
            finalized[sentence].append((normalized, hypothesis))
        # The best `beam` non-eos continuations go on (eos ones sort after every other).
        rank_key = torch.arange(top_scores.shape[1], device=device).expand_as(top_scores)
        rank_key = rank_key + is_eos.long() * top_scores.shape[1]
        rank_key = rank_key.masked_fill(~torch.isfinite(top_scores), 4 * top_scores.shape[1])
        keep = rank_key.topk(beam, dim=1, largest=False).indices
        next_scores = top_scores.gather(1, keep)
        next_scores = next_scores.masked_fill(rank_key.gather(1, keep) >= top_scores.shape[1],
                                              -torch.inf)
        next_beam, next_token = top_beam.gather(1, keep), top_token.gather(1, keep)
        # Done: `beam` hypotheses finalized, or nothing finite left to extend.
        done = torch.tensor(
            [len(finalized[int(s)]) >= beam for s in live], dtype=torch.bool, device=device
        )
        done |= ~torch.isfinite(next_scores).any(1)

        # Drop finished sentences from the batch, then reorder the survivors' beams.
        remaining = (~done).nonzero().squeeze(1)
        rows = (remaining[:, None] * beam + next_beam[remaining]).reshape(-1)
        live = live[remaining]
        if live.numel() == 0:
            break
        tokens = torch.cat([tokens[rows], next_token[remaining].reshape(-1, 1)], dim=1)
        scores = next_scores[remaining]
        memory = memory.index_select(0, rows)
        memory_mask = memory_mask.index_select(0, rows) if memory_mask is not None else None
        TransformerMT.reorder_cache(cache, rows)
        step += 1
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finalized]


@torch.no_grad()
def greedy_search(
    model: TransformerMT, src: Tensor, *, bos: int, eos: int, cfg: SearchConfig = SearchConfig()
) -> list[list[int]]:
    """Arg-max decoding with the same length limits, without a cache: the plain reference."""
    memory, memory_mask = model.encode(src)
    max_lens = _max_lengths(model, src, cfg)
    tokens = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
    finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for step in range(int(max_lens.max())):
        logits = model.decode(tokens, memory, memory_mask)[:, -1]
        lprobs = F.log_softmax(logits.float(), dim=-1)
        lprobs[:, model.pad] = -torch.inf
        lprobs[:, bos] = -torch.inf
        if step < cfg.min_len:
            lprobs[:, eos] = -torch.inf
        next_token = lprobs.argmax(-1)
        next_token = torch.where(step + 1 >= max_lens, torch.full_like(next_token, eos),
                                 next_token)
        next_token = next_token.masked_fill(finished, model.pad)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token.eq(eos)
        if bool(finished.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def sequence_log_prob(
    model: TransformerMT, src: Tensor, hypothesis: list[int], *, bos: int, eos: int
) -> float:
    """Sum of log-probabilities of ``hypothesis + [eos]`` for one source sentence (B = 1)."""
    target = torch.tensor([hypothesis + [eos]], dtype=torch.long, device=src.device)
    prev = torch.cat([torch.full_like(target[:, :1], bos), target[:, :-1]], dim=1)
    lprobs = F.log_softmax(model(src, prev).float(), dim=-1)
    lprobs[..., model.pad] = -torch.inf
    lprobs[..., bos] = -torch.inf
    return float(lprobs.gather(2, target[:, :, None]).sum())
