"""The arc-standard transition system, its static oracle and the 48 features of a configuration.

Conventions
-----------
* A sentence of ``n`` words is indexed ``1..n``; index ``0`` is the artificial ROOT.
* Arc-standard (Nivre 2004, as in Chen & Manning 2014): the stack starts as ``[ROOT]``, the buffer
  as ``1..n``.  SHIFT moves the buffer front onto the stack; LEFT-ARC(l) makes the top ``s1`` the
  head of the second ``s2`` and pops ``s2``; RIGHT-ARC(l) makes ``s2`` the head of ``s1`` and pops
  ``s1``.  ROOT may take a dependent only by RIGHT-ARC once the buffer is empty, so every
  terminal configuration is a projective tree with exactly one word attached to ROOT.
* Transition ids: ``0`` = SHIFT, ``1 + l`` = LEFT-ARC(l), ``1 + L + l`` = RIGHT-ARC(l) for label
  index ``l`` of ``L`` labels.
* Feature ids: ``0`` = NULL (no such position) in all three vocabularies; words and tags also have
  ``1`` = UNK and ``2`` = ROOT; label features are ``1 + l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ParseState", "OracleError", "legal_moves", "apply_transition", "extract_features",
           "oracle_transitions", "NULL", "UNK", "ROOT", "NUM_WORD_FEATURES", "NUM_TAG_FEATURES",
           "NUM_LABEL_FEATURES", "NUM_FEATURES"]

NULL, UNK, ROOT = 0, 1, 2
NUM_WORD_FEATURES = 18  # s1..s3, b1..b3, and 12 children of s1 and s2
NUM_TAG_FEATURES = 18  # the same 18 positions
NUM_LABEL_FEATURES = 12  # the 12 children positions
NUM_FEATURES = NUM_WORD_FEATURES + NUM_TAG_FEATURES + NUM_LABEL_FEATURES


class OracleError(ValueError):
    """The static oracle cannot derive a sentence's gold tree (non-projective or multi-rooted)."""


# --- the transition system ----------------------------------------------------------------------
@dataclass
class ParseState:
    """A configuration for a sentence of ``n`` words; ``labels`` holds label *feature* ids."""

    n: int
    stack: list[int] = field(default_factory=lambda: [0])
    buffer: int = 1  # the next word to shift; the buffer is empty when buffer > n
    heads: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    left: list[list[int]] = field(default_factory=list)  # left children, leftmost last
    right: list[list[int]] = field(default_factory=list)  # right children, rightmost last

    def __post_init__(self) -> None:
        if not self.heads:
            self.heads = [-1] * (self.n + 1)
            self.labels = [NULL] * (self.n + 1)
            self.left = [[] for _ in range(self.n + 1)]
            self.right = [[] for _ in range(self.n + 1)]

    @property
    def terminal(self) -> bool:
        return len(self.stack) == 1 and self.buffer > self.n


def legal_moves(state: ParseState) -> tuple[bool, bool, bool]:
    """Whether SHIFT, LEFT-ARC and RIGHT-ARC are legal (the single-root rule included)."""
    depth = len(state.stack)
    buffer_empty = state.buffer > state.n
    return (not buffer_empty, depth > 2, depth > 2 or (depth == 2 and buffer_empty))


def apply_transition(state: ParseState, transition: int, num_labels: int) -> None:
    """Apply transition id ``transition``; the caller guarantees it is legal."""
    stack = state.stack
    if transition == 0:
        stack.append(state.buffer)
        state.buffer += 1
        return
    if transition <= num_labels:  # LEFT-ARC: s1 heads s2
        dependent = stack.pop(-2)
        head = stack[-1]
        label = transition - 1
        # Each new left dependent is the stack element just below the head, so it lies left of
        # all earlier ones: appending keeps the leftmost child last.
        state.left[head].append(dependent)
    else:  # RIGHT-ARC: s2 heads s1
        dependent = stack.pop()
        head = stack[-1]
        label = transition - 1 - num_labels
        state.right[head].append(dependent)  # right dependents arrive left to right
    state.heads[dependent] = head
    state.labels[dependent] = 1 + label


def extract_features(state: ParseState, words: Sequence[int], tags: Sequence[int]) -> list[int]:
    """Chen & Manning (2014)'s 48 features: 18 word ids, 18 tag ids, 12 label ids.

    Positions: s1, s2, s3, b1, b2, b3, then for s = s1, s2: lc1(s), rc1(s), lc2(s), rc2(s),
    lc1(lc1(s)), rc1(rc1(s)).  ``words``/``tags`` are ids indexed by position (0 = ROOT).
    """
    stack, left, right = state.stack, state.left, state.right
    depth = len(stack)
    s1 = stack[-1] if depth > 0 else -1
    s2 = stack[-2] if depth > 1 else -1
    s3 = stack[-3] if depth > 2 else -1
    b, n = state.buffer, state.n
    positions = [
        s1,
        s2,
        s3,
        b if b <= n else -1,
        b + 1 if b + 1 <= n else -1,
        b + 2 if b + 2 <= n else -1,
    ]
    children: list[int] = []
    for s in (s1, s2):
        if s < 0:
            children += [-1, -1, -1, -1, -1, -1]
            continue
        lefts, rights = left[s], right[s]
        lc1 = lefts[-1] if lefts else -1
        rc1 = rights[-1] if rights else -1
        lc2 = lefts[-2] if len(lefts) > 1 else -1
        rc2 = rights[-2] if len(rights) > 1 else -1
        lc1lc1 = left[lc1][-1] if lc1 >= 0 and left[lc1] else -1
        rc1rc1 = right[rc1][-1] if rc1 >= 0 and right[rc1] else -1
        children += [lc1, rc1, lc2, rc2, lc1lc1, rc1rc1]
    positions += children
    labels = state.labels
    return (
        [words[p] if p >= 0 else NULL for p in positions]
        + [tags[p] if p >= 0 else NULL for p in positions]
        + [labels[p] if p >= 0 else NULL for p in children]
    )


def oracle_transitions(
    heads: Sequence[int],
    label_ids: Sequence[int],
    num_labels: int,
    words: Sequence[int] | None = None,
    tags: Sequence[int] | None = None,
) -> tuple[list[int], list[list[int]]]:
    """The static arc-standard oracle: the transitions that build the gold tree (and, if ``words``
    and ``tags`` are given, the features of every configuration on the way).

    Prefers LEFT-ARC, then RIGHT-ARC once ``s1`` has all its dependents, then SHIFT.  Raises
    :class:`OracleError` if the gold tree is not derivable (non-projective or not single-rooted).
    """
    n = len(heads)
    gold = [-1, *heads]
    missing = [0] * (n + 1)  # dependents of each position not yet attached
    for h in heads:
        missing[h] += 1
    state = ParseState(n)
    transitions: list[int] = []
    features: list[list[int]] = []
    while not state.terminal:
        if words is not None and tags is not None:
            features.append(extract_features(state, words, tags))
        stack = state.stack
        depth = len(stack)
        if depth > 2 and gold[stack[-2]] == stack[-1]:
            t = 1 + label_ids[stack[-2] - 1]
        elif (
            depth >= 2
            and gold[stack[-1]] == stack[-2]
            and missing[stack[-1]] == 0
            and (stack[-2] != 0 or state.buffer > n)
        ):
            t = 1 + num_labels + label_ids[stack[-1] - 1]
        elif state.buffer <= n:
            t = 0
        else:
            raise OracleError("no transition leads to the gold tree (non-projective tree?)")
        if t != 0:
            dependent = stack[-2] if t <= num_labels else stack[-1]
            missing[gold[dependent]] -= 1
        apply_transition(state, t, num_labels)
        transitions.append(t)
    if state.heads[1:] != list(heads):
        raise OracleError("the oracle's tree differs from the gold tree (not single-rooted?)")
    return transitions, features
