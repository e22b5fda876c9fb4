"""The paper's result tables (docs/paper.md §4) as data, for every task's reports.

``paper_number("mnist", "adanorm")`` -> ``99.35``; ``"diverge"`` where the paper reports divergence;
``None`` where a dataset is not one of the paper's eight columns (e.g. a stand-in dataset such as
tiny Shakespeare, whose numbers are not comparable).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["paper_table", "paper_column", "paper_number", "PAPER_NORMS"]

PAPER_NORMS = ("layernorm", "layernorm-simple", "none", "detachnorm", "adanorm")


@functools.cache
def paper_table() -> dict[str, Any]:
    with open(Path(__file__).with_name("paper_numbers.json"), encoding="utf-8") as fh:
        return json.load(fh)


def paper_column(dataset: str) -> str | None:
    """The paper's column key for a dataset name, or None if the paper has no such column."""
    table = paper_table()
    key = dataset.lower()
    key = table["aliases"].get(key, key)
    return key if key in table["columns"] else None


def paper_number(dataset: str, norm: str) -> float | str | None:
    """The paper's test number for ``norm`` on ``dataset`` (norm kwargs such as C are ignored:
    the paper reports one AdaNorm number per column)."""
    column = paper_column(dataset)
    if column is None:
        return None
    return paper_table()["results"].get(norm, {}).get(column)
