"""The adanorm command: the reproduction lab of "Understanding and Improving Layer Normalization".

adanorm demo                         five norms on scikit-learn's digits, table + plot
adanorm train mnist --preset cpu --set model.norm=adanorm model.norm_kwargs.scale=2
torchrun --nproc-per-node 2 -m adanorm.lab.cli train mnist --preset cpu
adanorm sweep mnist --norms layernorm,layernorm-simple,none,detachnorm,adanorm --seeds 3
adanorm report runs/sweep-mnist [--json] [--refuse-mixed]
adanorm download mnist [--data-dir DIR]
adanorm tasks
adanorm analyze mnist --norms layernorm-simple,detach-mean,detach-std,detachnorm,adanorm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, load_config

if TYPE_CHECKING:
    from .report import Report

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="cpu",
        help="config preset: paper, cpu or smoke, or a path to a YAML file (default: cpu)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. optim.lr=1e-3",
    )
    p.add_argument(
        "--data-dir", default=None, help="data root (default: $ADANORM_DATA, else ~/.cache/adanorm)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adanorm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (under torchrun: DDP)")
    p.add_argument("task")
    _add_common(p)
    p.add_argument("--run-dir", default=None, help="default: runs/<task>-<preset>-<norm>-seed<N>")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sweep", help="norms x seeds (x scales x datasets), resumable")
    p.add_argument("task")
    _add_common(p)
    p.add_argument("--norms", default="layernorm,layernorm-simple,none,detachnorm,adanorm")
    p.add_argument("--seeds", default="3", help="a count (3 -> seeds 1,2,3) or a list 1,5,9")
    p.add_argument("--scales", default=None, help="AdaNorm C values, e.g. 1,2")
    p.add_argument("--datasets", default=None, help="data.name values, e.g. rt,sst5")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/sweep-<task>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    p = sub.add_parser("report", help="tables and plots of a directory of runs")
    p.add_argument("dir")
    p.add_argument(
        "--data-dir",
        default=None,
        help="data root for the chance-level check (default: $ADANORM_DATA, else the cache)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", default=None, help="where to write report.md/csv/png (default: DIR)")
    p.add_argument(
        "--refuse-mixed",
        action="store_true",
        help="error if a dataset's runs differ in config beyond the seed (default: one labelled "
        "column per config)",
    )

    p = sub.add_parser("demo", help="the five norms on scikit-learn's digits (< 2 minutes)")
    p.add_argument(
        "--out", default="adanorm-demo", help="output directory (default ./adanorm-demo)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per norm (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the demo's models are too small to gain from more)",
    )

    p = sub.add_parser("download", help="download and verify a dataset")
    p.add_argument("dataset")
    p.add_argument("--data-dir", default=None)

    sub.add_parser("tasks", help="list tasks, their datasets and presets")

    p = sub.add_parser(
        "analyze", help="Theorem 1 gradient statistics, generalization gap, C sweep, depth ablation"
    )
    p.add_argument("task")
    _add_common(p)
    p.add_argument("--norms", default="layernorm-simple,detach-mean,detach-std,detachnorm,adanorm")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    p.add_argument("--scales", default="0.5,1,2,3", help="AdaNorm C sweep ('' to skip)")
    p.add_argument(
        "--depths",
        nargs="*",
        default=[],
        metavar="VALUE",
        help="values of --depth-key for the detach-mean/detach-std ablation, e.g. 2 6 or "
        "'[16,32]' '[16,16,32,32]' (YAML)",
    )
    p.add_argument("--depth-key", default="model.layers", help="config key that sets depth")
    p.add_argument("--every", type=int, default=10, help="record gradients every N updates")
    p.add_argument("--out", default=None, help="output directory (default runs/analyze-<task>)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    flat = [item for group in args.overrides for item in group]
    if getattr(args, "threads", None):
        flat.append(f"train.threads={args.threads}")
    return flat


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    overrides = _overrides(args)
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.task, args.preset, overrides)
    preset_name = Path(args.preset).stem
    run_dir = args.run_dir or (
        f"runs/{args.task}-{preset_name}-{cfg['model']['norm']}-seed{cfg['seed']}"
    )
    results = Trainer(cfg, run_dir, data_dir=args.data_dir, resume=args.resume, argv=sys.argv).fit()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        metric = results["test_metric"]
        print(
            f"{run_dir}: test {metric} = {results['test'][metric]:.4f} "
            f"(valid {results['valid_metric']} = {results['valid'][results['valid_metric']]:.4f}"
            f", best step {results['best_step']}, {results['train_seconds']:.0f}s)"
        )
        # Each BLEU with what it is (tokenized vs detokenized sacreBLEU and its signature).
        for key, definition in results.get("bleu_definitions", {}).items():
            print(f"  {key} = {results['test'][key]:.2f}: {definition}")
    from .distributed import cleanup

    cleanup()
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_list, parse_seeds, plan_sweep, run_sweep

    out = Path(args.out or f"runs/sweep-{args.task}")
    scales = None
    if args.scales:
        try:
            scales = [float(s) for s in parse_list(args.scales, "scales")]
        except ValueError as exc:
            raise ConfigError(f"--scales must be numbers, got {args.scales!r}") from exc
    if args.datasets:
        datasets = parse_list(args.datasets, "datasets")
    else:  # the preset's own dataset (after any --set data.name=...)
        datasets = [str(load_config(args.task, args.preset, _overrides(args))["data"]["name"])]
    runs = plan_sweep(
        args.task,
        out,
        parse_list(args.norms, "norms"),
        parse_seeds(args.seeds),
        scales,
        datasets,
    )
    outcomes = run_sweep(
        args.task,
        out,
        runs,
        preset=args.preset,
        overrides=_overrides(args),
        data_dir=args.data_dir,
        jobs=args.jobs,
        argv=["adanorm", *sys.argv[1:]],
    )
    failed = [run for run, code in outcomes if code != 0]
    if not args.no_report and any(r.finished for r in runs):
        from .report import write_report

        report = write_report(out, data_dir=args.data_dir)
        print(report.markdown)
        _warn_chance(report)
    if failed:
        print(
            f"{len(failed)} run(s) failed; re-run the same command to retry them", file=sys.stderr
        )
        return 1
    return 0


def _warn_chance(report: Report) -> None:
    """The runs that learned nothing, and the columns not checked for it, on stderr: a table
    that hides them behind a mean is what the check exists to prevent."""
    for line in report.at_chance:
        print(f"adanorm report: warning: at chance level: {line}", file=sys.stderr)
    for line in report.unchecked:
        print(f"adanorm report: warning: chance level {line}", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, write_report

    try:
        report = write_report(
            Path(args.dir),
            Path(args.out) if args.out else None,
            refuse_mixed=args.refuse_mixed,
            data_dir=args.data_dir,
        )
    except ReportError as exc:
        print(f"adanorm report: error: {exc}", file=sys.stderr)
        return 2
    _warn_chance(report)
    if args.json:
        print(json.dumps(report.rows, indent=2))
    else:
        print(report.markdown)
        print(f"\nwrote {', '.join(str(p) for p in report.files)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    started = time.perf_counter()
    report = run_demo(Path(args.out), seeds=args.seeds, threads=args.threads)
    print(report.markdown)
    print(f"\nwrote {', '.join(str(p) for p in report.files)}")
    print(f"demo took {time.perf_counter() - started:.0f}s")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .data import available_datasets, require_dataset

    if args.dataset not in available_datasets():
        raise ConfigError(
            f"unknown dataset {args.dataset!r}; known datasets: {', '.join(available_datasets())}"
        )

    path = require_dataset(args.dataset, args.data_dir, download=True)
    print(f"{args.dataset}: verified in {path}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from .config import available_presets
    from .task import available_tasks, get_task

    for name in available_tasks():
        cls = get_task(name)
        print(
            f"{name}: datasets {', '.join(cls.datasets) or name}; presets "
            f"{', '.join(available_presets(name)) or 'none'}; valid {cls.valid_metric} "
            f"({cls.valid_mode}), test {cls.test_metric}"
        )
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import yaml

    from .analyze import analyze

    out = Path(args.out or f"runs/analyze-{args.task}")
    tables = analyze(
        args.task,
        [n for n in args.norms.split(",") if n],
        out=out,
        preset=args.preset,
        seeds=args.seeds,
        scales=[float(c) for c in args.scales.split(",") if c],
        depths=[yaml.safe_load(d) for d in args.depths],
        depth_key=args.depth_key,
        overrides=_overrides(args) + ["train.progress=false"],
        gradstats_every=args.every,
        data_dir=args.data_dir,
    )
    for text in tables.values():
        print(text)
    print(f"tables and plots written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "train": _cmd_train,
        "sweep": _cmd_sweep,
        "report": _cmd_report,
        "demo": _cmd_demo,
        "download": _cmd_download,
        "tasks": _cmd_tasks,
        "analyze": _cmd_analyze,
    }[args.command]
    try:
        return handler(args)
    except _user_errors() as exc:
        # What the user can fix gets one line naming it; anything else is a bug and keeps its
        # traceback.
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"adanorm {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message names the bad file or value and what to do."""
    from .checkpoint import CheckpointError
    from .data import ChecksumError, DataMissingError
    from .download import DownloadError
    from .report import ReportError
    from .trainer import RunDirError, TrainingOutOfMemoryError

    return (
        ConfigError,
        ReportError,
        DataMissingError,
        ChecksumError,
        DownloadError,
        RunDirError,
        CheckpointError,
        TrainingOutOfMemoryError,
        FloatingPointError,
    )


if __name__ == "__main__":
    sys.exit(main())
