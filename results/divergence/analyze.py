"""Did the deep post-norm Transformer diverge?  The table and figure of results/divergence.

    python results/divergence/analyze.py results/divergence

Reads every run below ``<dir>/<arm>/runs/multi30k/<norm>/seed<k>/`` (``metrics.jsonl``,
``train.log``, ``results.json``) and classifies it by one written rule:

* **non-finite**: the trainer stopped on a non-finite training loss (its one-line error in
  ``train.log`` names the update);
* **exploded**: after update 100, a logged training loss (a mean over 10 updates) rose above the
  first one logged (update 10), i.e. training went back above where it started;
* **trained**: it finished all its updates without either;
* **unfinished**: stopped from outside (a GPU call's time limit, or the end of a CPU working
  period, to be resumed from its checkpoint) before any of the above; it is listed, never counted
  as trained.

Writes ``<dir>/report.md`` (one row per arm and norm: outcome per seed, the device each seed ran
on (from its ``run.json``; the outcome can depend on it, so it is never left out), the update and
the loss where it went wrong, the last logged training loss and the validation loss) and
``<dir>/train_loss.png`` (training loss against updates, one panel per arm), both atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

EXPLODE_AFTER = 100
NONFINITE = re.compile(r"non-finite training loss (\S+) at step (\d+)")
ARM_TITLES = {
    "paper_warmup": "paper's schedule: warm-up 8,000 updates to 1.5e-3",
    "short_warmup": "warm-up 400 updates to 1.5e-3",
}
NORM_ORDER = ["layernorm", "adanorm_C2", "none", "detachnorm"]
NORM_NAMES = {"layernorm": "LayerNorm", "adanorm_C2": "AdaNorm (C = 2)", "none": "w/o Norm",
              "detachnorm": "DetachNorm"}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def classify(run: Path) -> dict:
    train, valid = [], []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "train":
                train.append((record["step"], record["loss"]))
            elif record.get("split") == "valid":
                valid.append((record["step"], record["loss"]))
    log = (run / "train.log").read_text(errors="replace") if (run / "train.log").exists() else ""
    out = {"train": train, "valid": valid, "last_train": train[-1][1] if train else None,
           "valid_loss": valid[-1][1] if valid else None}
    exploded = None
    if train:
        start = train[0][1]
        exploded = next(((step, loss) for step, loss in train
                         if step > EXPLODE_AFTER and (not math.isfinite(loss) or loss > start)),
                        None)
    out["exploded"] = exploded
    found = NONFINITE.search(log)
    if found:
        return {**out, "outcome": "non-finite", "step": int(found.group(2)),
                "loss": float(found.group(1))}
    if exploded:
        return {**out, "outcome": "exploded", "step": exploded[0], "loss": exploded[1]}
    if (run / "results.json").exists():
        return {**out, "outcome": "trained", "step": None, "loss": None}
    return {**out, "outcome": "unfinished", "step": train[-1][0] if train else 0, "loss": None}


def device_of(run: Path) -> str:
    """The device a run trained on, from its ``run.json`` (a GPU by name, else ``CPU``)."""
    info = run / "run.json"
    if not info.exists():
        raise SystemExit(f"{run}: no run.json, so its device is unknown; re-run it with adanorm")
    environment = json.loads(info.read_text()).get("environment", {})
    device = environment.get("device")
    if device == "cuda":
        return environment.get("cuda_device") or "CUDA (unnamed)"
    if device == "cpu":
        return "CPU"
    raise SystemExit(f"{run}/run.json: environment.device is {device!r}; expected 'cuda' or 'cpu'")


def _devices(seeds: dict[int, dict]) -> str:
    """``NVIDIA H200`` when every seed ran there, else ``1, 2: NVIDIA H200; 3: CPU``."""
    by_device: dict[str, list[int]] = defaultdict(list)
    for seed in sorted(seeds):
        by_device[seeds[seed]["device"]].append(seed)
    if len(by_device) == 1:
        return next(iter(by_device))
    return "; ".join(f"{', '.join(map(str, s))}: {d}" for d, s in by_device.items())


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _where(seed: int, info: dict) -> str:
    parts = []
    if info["exploded"]:
        parts.append(f"above its start at {info['exploded'][0]} ({_fmt(info['exploded'][1])})")
    if info["outcome"] == "non-finite":
        parts.append(f"loss {info['loss']} at {info['step']}")
    return f"seed {seed}: " + ", ".join(parts)


def main(root: Path) -> None:
    arms: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for run in sorted(root.glob("*/runs/*/*/seed*")):
        arm, norm, seed = run.parts[-5], run.parts[-2], int(run.name.removeprefix("seed"))
        arms[arm][norm][seed] = {**classify(run), "device": device_of(run)}
    if not arms:
        raise SystemExit(f"no runs below {root}/<arm>/runs/; run results/converge/gpu_sweep.sh")
    lines = [
        "# Divergence of a deep post-norm Transformer (Multi30k De→En, 6+6 layers)",
        "",
        "Generated by `python results/divergence/analyze.py results/divergence` from the runs in "
        "`results/divergence/*/runs` (preset `mt/diverge`; commands in README.md).",
        "",
        f"Rule: **non-finite** = the trainer stopped on a non-finite training loss; **exploded** = "
        f"after update {EXPLODE_AFTER} a logged training loss (mean of 10 updates) rose above the "
        "first logged one (update 10); **trained** = neither, over all its updates; "
        "**unfinished** = stopped from outside before any of these (not counted). Device: where "
        "each seed trained (`run.json`); in the figure, CPU runs are dashed.",
        "",
        "| Arm | Norm | Device | Outcome per seed | Where (update) | Last logged train loss "
        "| Valid loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in sorted(arms, key=lambda a: list(ARM_TITLES).index(a) if a in ARM_TITLES else 99):
        for norm in sorted(arms[arm], key=lambda n: NORM_ORDER.index(n) if n in NORM_ORDER else 99):
            seeds = arms[arm][norm]
            outcome = ", ".join(f"{s}: {seeds[s]['outcome']}" for s in sorted(seeds))
            where = "; ".join(_where(s, seeds[s]) for s in sorted(seeds)
                              if seeds[s]["outcome"] in ("non-finite", "exploded")) or "—"
            last = ", ".join(_fmt(seeds[s]["last_train"]) for s in sorted(seeds))
            valid = ", ".join(_fmt(seeds[s]["valid_loss"]) for s in sorted(seeds))
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | {NORM_NAMES.get(norm, norm)} | "
                         f"{_devices(seeds)} | {outcome} | {where} | {last} | {valid} |")
    _atomic_write(root / "report.md", ("\n".join(lines) + "\n").encode())

    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(arms)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    colors = {norm: f"C{i}" for i, norm in enumerate(NORM_ORDER)}
    for ax, arm in zip(axes[0], names, strict=True):
        for norm, seeds in sorted(arms[arm].items()):
            for k, (_seed, info) in enumerate(sorted(seeds.items())):
                steps = [s for s, _ in info["train"]]
                # Non-finite or huge losses are drawn at the top of the axis.
                losses = [min(v, 1e3) if math.isfinite(v) else 1e3 for _, v in info["train"]]
                ax.plot(steps, losses, color=colors.get(norm, "k"), lw=1, alpha=0.8,
                        ls="--" if info["device"] == "CPU" else "-",
                        label=NORM_NAMES.get(norm, norm) if k == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("update")
        ax.set_ylabel("training loss (mean of 10 updates)")
        ax.set_title(ARM_TITLES.get(arm, arm), fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    _atomic_write(root / "train_loss.png", buffer.getvalue())
    print(root / "report.md")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python results/divergence/analyze.py results/divergence")
    main(Path(sys.argv[1]))
