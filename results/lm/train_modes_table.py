"""The Markdown table of results/lm/README.md "Training modes" from the runs of run_train_modes.sh.

    python results/lm/train_modes_table.py results/lm/train_modes/runs
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(root: Path) -> None:
    rows: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/seed*/results.json")):
        rows.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    if not rows:
        raise SystemExit(f"no */seed*/results.json under {root}")
    print("| train_mode | seed | valid BPC | test BPC | train s (incl. in-loop evals) | "
          "s / update |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, results in rows.items():
        for r in results:
            print(f"| {mode} | {r['seed']} | {r['valid']['bpc']:.3f} | {r['test']['bpc']:.3f} | "
                  f"{r['train_seconds']:.0f} | {r['train_seconds'] / r['steps']:.3f} |")
    print()
    print("| train_mode | runs | valid BPC (mean ± sd) | test BPC (mean ± sd) |")
    print("| --- | ---: | ---: | ---: |")
    for mode, results in rows.items():
        cells = []
        for split in ("valid", "test"):
            values = [r[split]["bpc"] for r in results]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {mode} | {len(results)} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/lm/train_modes/runs"))
