"""Norms compared across seeds: paired or Welch t-tests with 95 % intervals, Holm's correction
over a report's comparisons, and the win / tie / loss verdict."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .runs import ReportError

__all__ = ["Comparison", "compare", "holm", "verdict", "compare_to_reference", "VERDICT_RULE"]


@dataclass(frozen=True)
class Comparison:
    """One norm against another within a column (same dataset and config).

    ``delta`` is the estimate the test and the interval are about: with two or more seeds in
    common, the mean of the per-seed differences over those seeds (``paired``; equal to the
    difference of the means when both ran the same seeds); otherwise the difference of the means
    (Welch).  ``low``/``high``: the two-sided 95 % t interval of ``delta``; ``p``: the two-sided
    p-value of the matching t-test; ``n``: the pairs (paired) or the seeds of the row (Welch).
    ``p`` and the interval are None when there are too few seeds for a test."""

    delta: float
    low: float | None
    high: float | None
    p: float | None
    test: str
    n: int


CONFIDENCE = 0.95
ALPHA = 0.05
VERDICT_RULE = (
    f"Verdict: **win** when the Holm-corrected p < {ALPHA} and the norm is better than the one it "
    "is compared with (higher accuracy, UAS or BLEU; lower BPC or loss), **loss** when the "
    f"corrected p < {ALPHA} and it is worse, **tie** otherwise (corrected p >= {ALPHA}, the "
    "boundary included); **n/a** when there are too few seeds for a test (fewer than 2 paired "
    "seeds and fewer than 2 seeds on either side). Holm's step-down correction runs over every "
    "comparison in the report (all columns, all rows of the Δ table and the claims), so the "
    "family-wise error rate is at most 5 %."
)


def _t_stats():  # scipy is a dependency of adanorm[lab]; fail in one line without it
    try:
        from scipy import stats
    except ImportError:
        raise ReportError(
            "scipy is not installed, so the report cannot give p-values and intervals; "
            "pip install 'adanorm[lab]'"
        ) from None
    return stats


def compare(row_seeds: dict[int, float], ref_seeds: dict[int, float]) -> Comparison:
    """Compare per-seed values ``row_seeds`` with ``ref_seeds`` (see :class:`Comparison`)."""
    stats = _t_stats()
    common = sorted(set(row_seeds) & set(ref_seeds))
    quantile = 0.5 + CONFIDENCE / 2
    if len(common) >= 2:
        diffs = [row_seeds[s] - ref_seeds[s] for s in common]
        n = len(diffs)
        mean = statistics.fmean(diffs)
        sd = statistics.stdev(diffs)
        if sd == 0.0:  # constant differences: the interval is the point, p is 1 or 0
            return Comparison(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, "paired t", n)
        se = sd / math.sqrt(n)
        t = mean / se
        half = float(stats.t.ppf(quantile, n - 1)) * se
        p = float(2 * stats.t.sf(abs(t), n - 1))
        return Comparison(mean, mean - half, mean + half, p, "paired t", n)
    a, b = list(row_seeds.values()), list(ref_seeds.values())
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(delta, None, None, None, "n < 2", len(a))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Comparison(delta, delta, delta, 1.0 if delta == 0.0 else 0.0, "Welch t", len(a))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(quantile, df)) * se
    p = float(2 * stats.t.sf(abs(delta / se), df))
    return Comparison(delta, delta - half, delta + half, p, "Welch t", len(a))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input order; None (no test) stays None and is
    not counted in the family.  Adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j))."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def verdict(delta: float, p_holm: float | None, higher_is_better: bool) -> str:
    """win / loss / tie / n/a by :data:`VERDICT_RULE`."""
    if p_holm is None:
        return "n/a"
    if p_holm >= ALPHA or delta == 0.0:
        return "tie"
    better = delta > 0 if higher_is_better else delta < 0
    return "win" if better else "loss"


def compare_to_reference(
    row: dict[str, Any], ref: dict[str, Any]
) -> tuple[float, float | None, str]:
    """Δ and a two-sided p-value across seeds (see :func:`compare`; kept for callers of the
    earlier API)."""
    result = compare(row["_seeds"], ref["_seeds"])
    return result.delta, result.p, result.test
