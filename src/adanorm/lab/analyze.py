"""``adanorm analyze``: check Theorem 1 and the generalization argument on real training.

For a task, train each norm variant with :class:`adanorm.analysis.GradientStatsRecorder` attached
(``analysis.gradstats_every``), then write into the output directory:

* ``theorem1.md`` / ``.csv``: per variant, the measured mean of the input gradient (relative to its
  rms) and the variance ratio Var(dx)/(Var(g)/σ²), next to what Theorem 1 predicts;
* ``gradstats_<variant>.png``: these statistics over training, one line per layer depth;
* ``generalization.md`` / ``.csv``: final train loss vs valid loss (the gap), per norm;
* ``scale_sweep.md`` / ``.csv``: AdaNorm over C, with valid metric and gap;
* with ``--depths``: ``depth_ablation.md`` / ``.csv``, the paper's Table 3 (detach-mean vs
  detach-std) at several depths.

Runs live in ``<out>/runs/<name>``; finished runs are skipped, so an interrupted analysis resumes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import (
    ConfigError,
    load_config,
    read_yaml_mapping,
    resolve,
    resume_changes,
    set_path,
)
from .runinfo import norm_label

__all__ = ["VariantRun", "run_variant", "analyze", "THEOREM1_EXPECTATIONS"]

# What Theorem 1 predicts for the input gradient dx of each variant: its row mean (relative to its
# rms) is zero or not; Var(dx) / (Var(g)/sigma^2) is <= 1, = 1, or (AdaNorm) bounded by
# Var(phi*g)/sigma^2 instead.
THEOREM1_EXPECTATIONS: dict[str, tuple[str, str]] = {
    "layernorm": ("= 0", "<= 1 (w.r.t. w*g)"),
    "layernorm-simple": ("= 0", "<= 1"),
    "detach-mean": ("!= 0", "<= 1"),
    "detach-std": ("= 0", "= 1"),
    "detachnorm": ("!= 0", "= 1"),
    "adanorm": ("= 0", "<= Var(phi*g)/Var(g)"),
    "none": ("-", "-"),
}
ZERO_MEAN_TOLERANCE = 1e-3  # |mean(dx)|/rms(dx) below this counts as zero (float32 rounding)
RATIO_TOLERANCE = 1e-3


@dataclass
class VariantRun:
    """One finished training run and what it logged."""

    name: str
    norm: str
    norm_kwargs: dict[str, Any]
    seed: int
    run_dir: Path
    results: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    gradstats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return norm_label(self.norm, self.norm_kwargs)


def _read_metrics(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    train, valid, grads = [], [], []
    path = run_dir / "metrics.jsonl"
    # Committed analysis runs keep their (large) metrics gzip-compressed; a live run writes plain.
    if path.exists():
        text = path.read_text()
    else:
        with gzip.open(f"{path}.gz", "rt") as fh:
            text = fh.read()
    for line in text.splitlines():
        record = json.loads(line)
        split = record.get("split")
        if split == "train":
            train.append(record)
        elif split == "valid":
            valid.append(record)
        elif split == "gradstats":
            grads.append(record)
    return train, valid, grads


def run_variant(
    task: str,
    preset: str,
    norm: str,
    *,
    seed: int,
    out: Path,
    norm_kwargs: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    gradstats_every: int = 10,
    data_dir: str | None = None,
    progress: bool = False,
) -> VariantRun:
    """Train (or reuse a finished run of) one variant with gradient statistics recorded."""
    from .trainer import RESULTS, Trainer

    cfg = load_config(task, preset, overrides)
    set_path(cfg, "model.norm", norm)
    set_path(cfg, "model.norm_kwargs", dict(norm_kwargs or {}))
    set_path(cfg, "seed", seed)
    set_path(cfg, "analysis.gradstats_every", gradstats_every)
    for key, value in (extra or {}).items():
        set_path(cfg, key, value)
    label = norm_label(norm, norm_kwargs)
    name = name or f"{label}_s{seed}"
    run_dir = out / "runs" / name
    if (run_dir / RESULTS).exists():
        # Reusing a finished run is only right for the same experiment: a changed --set or
        # preset must not pass off the old run's numbers as the new config's.
        saved = resolve(read_yaml_mapping(run_dir / "config.yaml", "a run's config.yaml"))
        changed = resume_changes(saved, cfg, allow_longer=False)
        if changed:
            raise ConfigError(
                f"{run_dir} finished with a different config: {'; '.join(changed)}. Restore "
                "the analysis's preset and overrides, or use a new --out"
            )
        results = json.loads((run_dir / RESULTS).read_text())
    else:
        results = Trainer(cfg, run_dir, data_dir=data_dir, resume=True, progress=progress).fit()
    train, valid, grads = _read_metrics(run_dir)
    return VariantRun(
        name, norm, dict(norm_kwargs or {}), seed, run_dir, results, train, valid, grads
    )


# -- tables --------------------------------------------------------------------------------------


def _write_table(
    out: Path,
    stem: str,
    header: list[str],
    rows: list[list[Any]],
    title: str,
    notes: Iterable[str] = (),
) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    notes = list(notes)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    ckpt.atomic_write_text(out / f"{stem}.md", text)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[fmt(v) for v in row] for row in rows])
    ckpt.atomic_write_text(out / f"{stem}.csv", buffer.getvalue())
    return text


def _median_stat(run: VariantRun, stat: str, layer: str = "all") -> float:
    key = f"gradstats/{layer}/{stat}"
    values = [r[key] for r in run.gradstats if key in r and not math.isnan(r[key])]
    return statistics.median(values) if values else float("nan")


def _verdict_mean(expected: str, value: float) -> str:
    if expected == "-" or math.isnan(value):
        return "-"
    is_zero = value < ZERO_MEAN_TOLERANCE
    return "agrees" if is_zero == (expected == "= 0") else "DISAGREES"


def _verdict_ratio(expected: str, value: float) -> str:
    if math.isnan(value) or expected == "-":
        return "-"
    if "w*g" in expected:
        # The recorder's ratio uses g, the gradient wrt the affine output; LayerNorm's bound is
        # in w*g, the gradient wrt y: judging one against the other would be a wrong verdict.
        return "n/a (bound is in w*g)"
    if expected.startswith("= 1"):
        return "agrees" if abs(value - 1) < RATIO_TOLERANCE else "DISAGREES"
    if expected.startswith("<= 1"):
        return "agrees" if value <= 1 + RATIO_TOLERANCE else "DISAGREES"
    return "n/a (bound is in phi*g)"


def theorem1_table(runs: list[VariantRun], out: Path) -> str:
    by_label: dict[str, list[VariantRun]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    rows = []
    for label, group in by_label.items():
        norm = group[0].norm
        if norm == "none":
            # w/o Norm's slots hold identities (dx = g, no sigma): Theorem 1 has nothing to
            # measure there, which the row says rather than printing NaN statistics.
            rows.append([label, len(group)] + ["no norm layer"] + ["-"] * 6)
            continue
        exp_mean, exp_ratio = THEOREM1_EXPECTATIONS.get(norm, ("-", "-"))
        mean_rel = statistics.mean(_median_stat(r, "mean_rel") for r in group)
        ratio = statistics.mean(_median_stat(r, "var_ratio") for r in group)
        max_ratio = max(
            (
                max((v for k, v in rec.items() if k.endswith("/var_ratio")), default=float("nan"))
                for r in group
                for rec in r.gradstats
            ),
            default=float("nan"),
        )
        rows.append(
            [
                label,
                len(group),
                mean_rel,
                exp_mean,
                _verdict_mean(exp_mean, mean_rel),
                ratio,
                max_ratio,
                exp_ratio,
                _verdict_ratio(exp_ratio, ratio),
            ]
        )
    header = [
        "variant",
        "seeds",
        "|mean(dx)|/rms(dx)",
        "Theorem 1",
        "mean",
        "Var ratio (median)",
        "Var ratio (max over layers, steps)",
        "Theorem 1",
        "variance",
    ]
    notes = [
        "|mean(dx)|/rms(dx): per row, averaged over rows and norm layers; the median over recorded "
        "training steps, then the mean over seeds.",
        "Var ratio = Var(dx) / (Var(g)/sigma^2) per row with g the gradient wrt the norm's output "
        "and sigma the norm's own std; same aggregation.",
        f"'= 0' is judged as < {ZERO_MEAN_TOLERANCE}; '= 1' as within {RATIO_TOLERANCE}.",
        "AdaNorm's bound is Var(phi*g)/sigma^2 with phi = C(1-ky), and LayerNorm's is in w*g (the "
        "gradient wrt y, before the gain), so their ratios to Var(g)/sigma^2 are reported but not "
        "judged.",
    ]
    return _write_table(
        out,
        "theorem1",
        header,
        rows,
        "Theorem 1 on real training: input-gradient statistics per variant",
        notes,
    )


def _final_train_loss(run: VariantRun) -> float:
    return float(run.train[-1]["loss"]) if run.train else float("nan")


def generalization_table(
    runs: list[VariantRun],
    out: Path,
    stem: str = "generalization",
    title: str = "Generalization gap: final train loss vs valid loss",
) -> str:
    by_label: dict[str, list[VariantRun]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    metric = runs[0].results["valid_metric"]
    test_metric = runs[0].results["test_metric"]
    rows = []
    for label, group in by_label.items():
        train_loss = [_final_train_loss(r) for r in group]
        valid_loss = [float(r.results["valid"]["loss"]) for r in group]
        last_valid_loss = [float(r.valid[-1]["loss"]) if r.valid else float("nan") for r in group]
        gap = [v - t for v, t in zip(last_valid_loss, train_loss, strict=True)]
        valid_metric = [float(r.results["valid"][metric]) for r in group]
        test_value = [float(r.results["test"][test_metric]) for r in group]

        def mean_std(values: list[float]) -> str:
            if len(values) == 1:
                return f"{values[0]:.4f}"
            return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

        rows.append(
            [
                label,
                len(group),
                mean_std(train_loss),
                mean_std(last_valid_loss),
                mean_std(gap),
                mean_std(valid_loss),
                mean_std(valid_metric),
                mean_std(test_value),
            ]
        )
    header = [
        "norm",
        "seeds",
        "final train loss",
        "final valid loss",
        "gap (valid - train)",
        "best-ckpt valid loss",
        f"best valid {metric}",
        f"test {test_metric}",
    ]
    notes = [
        "final train loss: the last logged training loss (running mean over the last log "
        "interval, with dropout on, as trained); final valid loss: the last evaluation.",
        "mean ± std over seeds.",
    ]
    return _write_table(out, stem, header, rows, title, notes)


# -- plots ---------------------------------------------------------------------------------------


def plot_gradstats(run: VariantRun, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The model's depth order: the order in which layer keys first appear in the log.
    layers: list[str] = []
    for record in run.gradstats:
        for key in record:
            parts = key.split("/")
            if len(parts) == 3 and parts[1] != "all" and parts[1] not in layers:
                layers.append(parts[1])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("viridis")
    for depth, layer in enumerate(layers):
        color = cmap(depth / max(1, len(layers) - 1))
        for ax, stat in zip(axes, ("mean_rel", "var_ratio", "grad_in_norm"), strict=True):
            points = [
                (r["step"], r[f"gradstats/{layer}/{stat}"])
                for r in run.gradstats
                if f"gradstats/{layer}/{stat}" in r
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, color=color, lw=1, label=f"depth {depth}: {layer}")
    axes[0].set_title("|mean(dx)| / rms(dx)")
    axes[1].set_title("Var(dx) / (Var(g)/σ²)")
    axes[1].axhline(1.0, color="k", ls="--", lw=0.8)
    axes[2].set_title("‖dx‖")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("update")
    axes[0].set_yscale("symlog", linthresh=1e-6)
    handles, labels = axes[2].get_legend_handles_labels()
    if len(handles) <= 12:
        axes[2].legend(handles, labels, fontsize=7)
    fig.suptitle(
        f"{run.results['task']}/{run.results['dataset']} — {run.label}: input-gradient "
        f"statistics per norm layer (colour = depth)"
    )
    fig.tight_layout()
    path = out / f"gradstats_{_file_safe(run.label)}.png"
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_curves(runs: list[VariantRun], out: Path, stem: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
    seen: set[str] = set()
    colors = plt.get_cmap("tab10")
    labels = list(dict.fromkeys(r.label for r in runs))
    for run in runs:
        color = colors(labels.index(run.label) % 10)
        label = run.label if run.label not in seen else None
        seen.add(run.label)
        for ax, records, marker in ((ax_train, run.train, None), (ax_valid, run.valid, ".")):
            if records:
                ax.plot([r["step"] for r in records], [r["loss"] for r in records], color=color,
                        lw=1, alpha=0.8, marker=marker, label=label)
    ax_train.set_title("train loss")
    ax_valid.set_title("valid loss")
    for ax in (ax_train, ax_valid):
        ax.set_xlabel("update")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{stem}.png"
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _file_safe(label: str) -> str:
    """'adanorm(C=2)' -> 'adanorm-C2': no shell-special characters in file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", label.replace("(", "-"))


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    ckpt.atomic_write_bytes(path, buffer.getvalue())


# -- the command ---------------------------------------------------------------------------------


def analyze(
    task: str,
    norms: Sequence[str],
    *,
    out: Path,
    preset: str = "cpu",
    seeds: int = 1,
    scales: Sequence[float] = (0.5, 1.0, 2.0, 3.0),
    depths: Sequence[Any] = (),
    depth_key: str = "model.layers",
    overrides: Sequence[str] = (),
    gradstats_every: int = 10,
    data_dir: str | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Run the analysis; return the Markdown of every table written."""
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        out=out,
        overrides=overrides,
        gradstats_every=gradstats_every,
        data_dir=data_dir,
        progress=progress,
    )
    runs: list[VariantRun] = []
    for norm in norms:
        for seed in range(1, seeds + 1):
            kwargs = {"scale": 1.0} if norm == "adanorm" else {}
            runs.append(run_variant(task, preset, norm, seed=seed, norm_kwargs=kwargs, **common))
    tables: dict[str, str] = {}
    if runs:
        tables["theorem1"] = theorem1_table(runs, out)
        tables["generalization"] = generalization_table(runs, out)
        for run in runs:
            if run.seed == 1 and run.norm != "none":  # w/o Norm: identities, nothing to plot
                plot_gradstats(run, out)
        plot_curves(runs, out, "loss_curves", f"{task}: train and valid loss per norm")

    if scales:
        sweep = [
            run_variant(
                task, preset, "adanorm", seed=seed, norm_kwargs={"scale": float(c)}, **common
            )
            for c in scales
            for seed in range(1, seeds + 1)
        ]
        tables["scale_sweep"] = generalization_table(
            sweep, out, "scale_sweep", "AdaNorm: sweep of C (k = 0.1)"
        )
        plot_curves(sweep, out, "scale_sweep_curves", f"{task}: AdaNorm over C")

    if depths:
        ablation: list[VariantRun] = []
        rows = []
        for value in depths:
            # A depth is a layer count, or (for the CNNs) a list of widths: its length.
            depth = len(value) if isinstance(value, list) else value
            group = []
            for norm in ("layernorm-simple", "detach-mean", "detach-std", "detachnorm"):
                for seed in range(1, seeds + 1):
                    run = run_variant(
                        task,
                        preset,
                        norm,
                        seed=seed,
                        extra={depth_key: value},
                        name=f"depth{depth}_{norm}_s{seed}",
                        **common,
                    )
                    group.append(run)
            ablation += group
            metric = group[0].results["test_metric"]
            for norm in ("layernorm-simple", "detach-mean", "detach-std", "detachnorm"):
                values = [float(r.results["test"][metric]) for r in group if r.norm == norm]
                std = statistics.stdev(values) if len(values) > 1 else float("nan")
                rows.append([depth, norm, len(values), statistics.mean(values), std])
        tables["depth_ablation"] = _write_table(
            out,
            "depth_ablation",
            ["depth", "variant", "seeds", "test metric (mean)", "std"],
            rows,
            f"{task}: detach-mean vs detach-std at several depths (paper Table 3)",
            [
                "Claim tested: 'the derivative of variance matters more than that of the mean for "
                "deeper networks'. If it holds, detach-std falls further below LayerNorm-simple "
                "than detach-mean does, more so at larger depth.",
                f"depth is {depth_key}; test metric is {group[0].results['test_metric']}.",
            ],
        )
    return tables
