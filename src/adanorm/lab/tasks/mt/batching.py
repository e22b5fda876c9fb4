"""Batches by token count, fairseq's ``--max-tokens`` rule: the sentences of a split cut into
batches once, each batch one dataset example."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

__all__ = ["batches_by_tokens", "TokenBatches"]


def batches_by_tokens(
    src_lengths: Sequence[int],
    tgt_lengths: Sequence[int],
    max_tokens: int,
    *,
    max_sentences: int = 0,
    order: Sequence[int] | None = None,
) -> list[list[int]]:
    """Cut sentences into batches of at most ``max_tokens`` padded tokens.

    Sentences are taken in ``order`` (default: sorted by target then source length, so that a
    batch holds sentences of similar length and little padding), and a batch closes when one more
    sentence would make ``sentences * max(longest source, longest target)`` exceed
    ``max_tokens``, or reach ``max_sentences`` (> 0).  A single sentence longer than
    ``max_tokens`` is an error: it could never be trained on.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if order is None:
        order = sorted(range(len(src_lengths)), key=lambda i: (tgt_lengths[i], src_lengths[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        size = max(src_lengths[index], tgt_lengths[index])
        if size > max_tokens:
            raise ValueError(
                f"sentence {index} has {size} tokens (with eos), more than data.max_tokens="
                f"{max_tokens}; raise max_tokens or lower data.max_len"
            )
        full = max_sentences > 0 and len(current) >= max_sentences
        if current and ((len(current) + 1) * max(longest, size) > max_tokens or full):
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


class TokenBatches(Dataset):
    """A list of sentence-index batches: item ``i`` is the ``i``-th batch (a list of indices)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[int]:
        return self.batches[index]
