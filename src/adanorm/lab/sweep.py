"""Sweeps: every (dataset, norm, scale, seed) combination in its own run directory.

Layout: ``<out>/<dataset>/<norm label>/seed<k>/`` (e.g. ``runs/mnist/mnist/adanorm_C2/seed3``).
A run whose ``results.json`` exists is skipped and an unfinished run is resumed from its last
checkpoint, so re-running an interrupted sweep finishes it.  Each run is a separate
``adanorm train`` process (output in ``train.log`` of its directory), so ``--jobs`` runs in
parallel.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_text
from .config import (
    ConfigError,
    canonical_norm,
    load_config,
    read_yaml_mapping,
    resolve,
    resume_changes,
)
from .runs import pooled_key

__all__ = ["SweepRun", "plan_sweep", "run_sweep", "parse_seeds", "parse_list", "parse_run_path"]


@dataclass(frozen=True)
class SweepRun:
    dataset: str
    norm: str
    scale: float | None
    seed: int
    run_dir: Path

    def overrides(self) -> list[str]:
        out = [f"data.name={self.dataset}", f"model.norm={self.norm}", f"seed={self.seed}"]
        if self.scale is not None:
            out.append(f"model.norm_kwargs.scale={self.scale:g}")
        return out

    @property
    def finished(self) -> bool:
        return (self.run_dir / "results.json").exists()


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty")
    return items


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 1, 2, 3; ``"1,5,9"`` -> those seeds."""
    try:
        if "," in text:
            return [int(t) for t in parse_list(text, "seeds")]
        count = int(text)
    except ValueError as exc:
        raise ConfigError(f"--seeds must be a count or a comma list of ints, got {text!r}") from exc
    if count < 1:
        raise ConfigError(f"--seeds must be >= 1, got {count}")
    return list(range(1, count + 1))


def _label(norm: str, scale: float | None) -> str:
    return norm if scale is None else f"{norm}_C{scale:g}"


def parse_run_path(relative: str | Path) -> SweepRun:
    """The run a sweep's ``sweep.json`` lists as ``relative`` (``<dataset>/<label>/seed<k>``,
    relative to its ``--out``), with ``run_dir`` left relative: the inverse of
    :func:`plan_sweep`'s layout, so a run that has not started can still be named."""
    parts = Path(relative).parts
    fix = "expected <dataset>/<norm>[_C<scale>]/seed<k>, as adanorm sweep writes it"
    if len(parts) != 3 or not parts[2].startswith("seed") or not parts[2][4:].isdigit():
        raise ConfigError(f"sweep run {str(relative)!r}: {fix}")
    norm, marker, scale_text = parts[1].rpartition("_C")
    scale = None
    if marker:
        try:
            scale = float(scale_text)
        except ValueError:
            norm = parts[1]  # a norm whose own name holds "_C"
    else:
        norm = scale_text
    if not norm:
        raise ConfigError(f"sweep run {str(relative)!r}: no norm in {parts[1]!r}; {fix}")
    return SweepRun(parts[0], norm, scale, int(parts[2][4:]), Path(relative))


def plan_sweep(
    task: str,
    out: Path,
    norms: Sequence[str],
    seeds: Sequence[int],
    scales: Sequence[float] | None = None,
    datasets: Sequence[str] | None = None,
) -> list[SweepRun]:
    """The runs of a sweep; ``scales`` apply to AdaNorm only (its C).  Norm aliases (``ln``)
    are accepted as ``train`` accepts them, and the runs use the registered name."""
    canonical = [canonical_norm(norm, "--norms") for norm in norms]
    for given, name in zip(norms, canonical, strict=True):
        if canonical.count(name) > 1:
            raise ConfigError(f"--norms names the norm {name!r} twice (as {given!r}); list it once")
    norms = canonical
    if scales is not None and any(not s > 0 for s in scales):
        raise ConfigError(f"--scales must be positive, got {list(scales)}")
    runs = []
    for dataset in datasets or [None]:
        ds = dataset or task
        for norm in norms:
            for scale in scales if (scales and norm == "adanorm") else [None]:
                for seed in seeds:
                    run_dir = out / ds / _label(norm, scale) / f"seed{seed}"
                    runs.append(SweepRun(ds, norm, scale, seed, run_dir))
    return runs


def _check_unchanged(run: SweepRun, cfg: dict) -> None:
    """Refuse a sweep whose config differs from one its run ``run`` was started with: a started
    run may only get longer (it resumes from its checkpoint); a finished run is not re-run, so it
    must match in every key the report does not pool over (a finished 1-thread run pools with
    the 2-thread runs a later ``--threads 2`` sweep adds; a longer max_steps would not)."""
    saved_path = run.run_dir / "config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = resolve(read_yaml_mapping(saved_path, "a run's config.yaml"))
    except ConfigError as exc:
        raise ConfigError(f"{saved_path}: {exc}; cannot compare it with this sweep") from exc
    if run.finished:
        changed = resume_changes(saved, cfg, allow_longer=False, ignore=pooled_key)
    else:
        changed = resume_changes(saved, cfg)
    if changed:
        state = "finished" if run.finished else "started"
        raise ConfigError(
            f"{run.run_dir} was {state} with a different config ({saved_path}): "
            f"{'; '.join(changed)}. Restore the sweep's preset and overrides, or use a new --out"
        )


def _train_command(
    task: str,
    preset: str,
    run: SweepRun,
    overrides: Sequence[str],
    data_dir: str | None,
    threads: int | None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "adanorm.lab.cli",
        "train",
        task,
        "--preset",
        preset,
        "--run-dir",
        str(run.run_dir),
        "--resume",
        "--no-progress",
    ]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    for item in [*overrides, *run.overrides()]:
        cmd += ["--set", item]
    return cmd


def run_sweep(
    task: str,
    out: Path,
    runs: Sequence[SweepRun],
    *,
    preset: str = "cpu",
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    threads: int | None = None,
    jobs: int = 1,
    argv: Sequence[str] | None = None,
) -> list[tuple[SweepRun, int]]:
    """Run the unfinished ``runs``; return ``(run, exit code)`` for each run attempted.

    Before anything is written, every run's config is validated and compared with the
    ``config.yaml`` of a run already started or finished in its directory: a preset or override
    edited mid-sweep would otherwise mix hyper-parameters in one table silently.
    """
    for run in runs:
        cfg = load_config(task, preset, [*overrides, *run.overrides()])
        _check_unchanged(run, cfg)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in (argv or sys.argv))
    atomic_write_text(
        out / "sweep.json",
        json.dumps(
            {
                "task": task,
                "preset": preset,
                "overrides": list(overrides),
                "command": command,
                "runs": [str(r.run_dir.relative_to(out)) for r in runs],
            },
            indent=2,
        )
        + "\n",
    )
    todo = [r for r in runs if not r.finished]
    print(
        f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run "
        f"({jobs} at a time)",
        flush=True,
    )

    def launch(run: SweepRun) -> tuple[SweepRun, int]:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = _train_command(task, preset, run, overrides, data_dir, threads)
        started = time.time()
        with open(run.run_dir / "train.log", "ab") as log:
            code = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ).returncode
        status = "done" if code == 0 else f"FAILED (exit {code}, see {run.run_dir / 'train.log'})"
        print(
            f"  {run.run_dir.relative_to(out)}: {status} in {time.time() - started:.0f}s",
            flush=True,
        )
        return run, code

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(launch, todo))
