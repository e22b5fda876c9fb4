"""The training loop shared by every task.

The :class:`Trainer` knows nothing about images, text or parsing: it asks the
:class:`~adanorm.lab.task.Task` for datasets, the model, the loss and the metrics, and provides the
rest — seeding, AMP, gradient accumulation and clipping, lr schedules, periodic evaluation, early
stopping, best-checkpoint selection, atomic checkpoints with exact resume, DDP, a progress bar and
``metrics.jsonl``.

The run directory's layout is described in :mod:`adanorm.lab.rundir`; checkpoint averaging lives
in :mod:`adanorm.lab.averaging`, the samplers in :mod:`adanorm.lab.samplers`.

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)`` (shuffled, or
in index order for a task with ``shuffle_train = False``); a checkpoint
records the position inside the epoch, every RNG state and the byte length of ``metrics.jsonl``.
Resuming truncates ``metrics.jsonl`` to that length and replays the remaining steps, so a run that
was killed and resumed writes exactly the lines an uninterrupted run writes.  A ``metrics.jsonl``
shorter than recorded (lost lines) is refused; a resumed run without a checkpoint starts over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..analysis import GradientStatsRecorder
from . import checkpoint as ckpt
from .averaging import CheckpointAverager
from .config import ConfigError, resolve
from .distributed import DistInfo, all_reduce_sums, barrier, init_distributed
from .optim import build_optimizer
from .rundir import (
    BEST,
    LAST,
    METRICS,
    RESULTS,
    RunDirError,
    lock_run_dir,
    prepare_run_dir,
    write_provenance,
)
from .runinfo import norm_label
from .runtime import (
    NonfiniteLossWatch,
    TrainingOutOfMemoryError,
    is_out_of_memory,
    move_to_device,
    out_of_memory_error,
    process_settings,
    resolve_device,
    seed_everything,
)
from .samplers import GlobalBatchSampler, ShardSampler
from .schedules import lr_multiplier
from .task import Stats, Task, add_stats, get_task, stats_to_floats

__all__ = [
    "Trainer",
    "RunDirError",
    "TrainingOutOfMemoryError",
    "seed_everything",
    "resolve_device",
]



@dataclass
class TrainState:
    """Counters that, with the RNG states, determine the rest of the run."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    # Train stats since the last log line, and summed over the run.  Between logs the values may
    # be float64 tensors on the device (see Task.loss); checkpoints and results hold floats.
    log_sums: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    last_valid: dict[str, float] = field(default_factory=dict)


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=False, allow_nan=True) + "\n"


class Trainer:
    """Train ``cfg["task"]`` into ``run_dir``; see the module docstring.

    ``resume=True`` continues from ``run_dir/checkpoint_last.pt`` if it exists (and starts fresh
    otherwise); without it, a run directory that already holds a run is refused.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        run_dir: str | os.PathLike[str],
        *,
        data_dir: str | None = None,
        resume: bool = False,
        progress: bool | None = None,
        argv: list[str] | None = None,
    ) -> None:
        # Every key checked (and defaults filled) before anything is built or written.
        cfg = self.cfg = resolve(cfg)
        self.run_dir = Path(run_dir)
        self.data_dir = data_dir
        self.resume = resume
        tcfg = cfg["train"]
        self.show_progress = tcfg["progress"] if progress is None else progress
        self.argv = argv if argv is not None else list(sys.argv)

        self.device = resolve_device(tcfg["device"])
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)

        amp = tcfg["amp"]
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs CUDA; on CPU use train.amp=bf16")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

        self.task: Task = get_task(cfg["task"])(cfg, data_dir)
        self.state = TrainState()
        self.nonfinite = NonfiniteLossWatch()
        self._resume_state: dict[str, Any] | None = None

    # --- setup ----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # --- metrics file ---------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(_json_line(record))
            fh.flush()
            os.fsync(fh.fileno())

    def _metrics_size(self) -> int:
        path = self.run_dir / METRICS
        return path.stat().st_size if path.exists() else 0

    # --- checkpoints ----------------------------------------------------------------------------
    def _save_last(self) -> None:
        self.nonfinite.raise_if_seen(self.state.step)
        self.state.log_sums = stats_to_floats(self.state.log_sums)
        self.state.totals = stats_to_floats(self.state.totals)
        if self.dist.is_main:
            state = {
                "format": "adanorm-lab-checkpoint/1",
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "trainer": asdict(self.state),
                "rng": ckpt.capture_rng(),
                "metrics_bytes": self._metrics_size(),
                "config": json.loads(json.dumps(self.cfg)),
                "task": self.task.state_dict(),
            }
            ckpt.atomic_save(state, self.run_dir / LAST)
        else:  # each process has its own dropout stream; the main process saves only its own
            ckpt.atomic_save(ckpt.capture_rng(), self._rank_file("rng", self.state.step))
            task_state = self.task.state_dict()
            if task_state:  # e.g. the memory of this process's own LM streams
                ckpt.atomic_save(task_state, self._rank_file("task_state", self.state.step))
        barrier()
        if not self.dist.is_main:
            # Only now is checkpoint_last.pt at this step: a kill before the barrier leaves the
            # files of the step it still names (a single rng file overwritten in place could be a
            # checkpoint ahead of it, and a resumed run would then differ, silently).
            for kind in ("rng", "task_state"):
                current = self._rank_file(kind, self.state.step)
                for old in self.run_dir.glob(f"{kind}_rank{self.dist.rank}_step*.pt"):
                    if old != current:
                        old.unlink()
            (self.run_dir / f"rng_rank{self.dist.rank}.pt").unlink(missing_ok=True)

    def _rank_file(self, kind: str, step: int) -> Path:
        """This process's ``kind`` (rng or task_state) at ``step``: DDP ranks > 0 keep theirs
        beside the checkpoint, rank 0's is inside it."""
        return self.run_dir / f"{kind}_rank{self.dist.rank}_step{step:09d}.pt"

    def _save_best(self) -> None:
        if self.dist.is_main:
            state = {"format": "adanorm-lab-best/1", "model": self.module.state_dict(),
                     "step": self.state.step, "valid": dict(self.state.last_valid),
                     "config": json.loads(json.dumps(self.cfg))}
            ckpt.atomic_save(state, self.run_dir / BEST)

    def _load_last(self) -> None:
        state, self._resume_state = self._resume_state, None
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["trainer"])
        if self.dist.rank == 0:
            ckpt.restore_rng(state["rng"])
            self.task.load_state_dict(state.get("task", {}))
        else:
            rng = self._rank_file("rng", self.state.step)
            if not rng.exists():  # written before the files were named by step
                rng = self.run_dir / f"rng_rank{self.dist.rank}.pt"
            ckpt.restore_rng(ckpt.load_checkpoint(rng, ["python"]))
            path = self._rank_file("task_state", self.state.step)
            self.task.load_state_dict(ckpt.load_checkpoint(path) if path.exists() else {})
        # Lines written after this checkpoint are replayed by the resumed run: drop them.
        if self.dist.is_main:
            path = self.run_dir / METRICS
            if path.exists():
                with open(path, "r+b") as fh:
                    fh.truncate(int(state["metrics_bytes"]))
        barrier()

    # --- data -----------------------------------------------------------------------------------
    def _limited(self, dataset: Dataset) -> Dataset:
        limit = int(self.cfg["data"].get("max_examples") or 0)
        if limit and limit < len(dataset):  # type: ignore[arg-type]
            return Subset(dataset, range(limit))
        return dataset

    def _loader(self, dataset: Dataset, sampler: Sampler[list[int]], split: str) -> DataLoader:
        # A private generator: creating a DataLoader iterator draws a seed from its generator,
        # and drawing from the global one would shift dropout masks after a resume.
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=functools.partial(self.task.collate, split=split),
            num_workers=0,
            generator=torch.Generator().manual_seed(0),
        )

    def _eval_batches(self, dataset: Dataset, split: str) -> Iterator[Any]:
        # A task whose examples are batches evaluates one of them per call.
        size = 1 if self.task.examples_are_batches else self.cfg["data"]["eval_batch_size"]
        sampler = ShardSampler(len(dataset), size, self.dist.rank, self.dist.world_size)
        for batch in self._loader(dataset, sampler, split):
            yield move_to_device(batch, self.device)

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.valid_set if split == "valid" else self.test_set
        was_training = self.module.training
        self.module.eval()
        try:
            return self.task.evaluate(
                self.module,
                self._eval_batches(dataset, split),
                lambda stats: all_reduce_sums(stats_to_floats(stats), self.device),
                self._autocast,
                split,
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                step, during = self.state.step, f"{split} evaluation"
                raise out_of_memory_error(self.cfg, self.device, step, during, exc) from exc
            raise
        finally:
            self.module.train(was_training)

    # --- the loop -------------------------------------------------------------------------------
    def _micro_step(self, batch: Any, sync: bool, scale: float) -> Stats:
        context = (
            contextlib.nullcontext() if sync or not self.dist.enabled else self.model.no_sync()
        )
        with context:
            with self._autocast():
                loss, stats = self.task.loss(self.model, batch)
            self.nonfinite.note(loss.detach(), self.state.step)
            loss = loss * scale
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return stats

    def _optimizer_step(self, micro_batches: list[Any]) -> None:
        try:
            self._update(micro_batches)
        except Exception as exc:
            if is_out_of_memory(exc):
                step = self.state.step
                raise out_of_memory_error(self.cfg, self.device, step, "training", exc) from exc
            raise

    def _update(self, micro_batches: list[Any]) -> None:
        accum = len(micro_batches)
        recorder = self.grad_recorder
        recording = contextlib.nullcontext() if recorder is None else recorder.step(self.state.step)
        with recording:
            for i, batch in enumerate(micro_batches):
                stats = self._micro_step(
                    move_to_device(batch, self.device), sync=i == accum - 1, scale=1 / accum
                )
                add_stats(self.state.log_sums, stats)
                add_stats(self.state.totals, stats)
        clip = self.cfg["optim"]["clip_norm"]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.batch_in_epoch += accum
        if self.grad_recorder is not None:
            grad_stats = self.grad_recorder.pop()
            if grad_stats:  # this process's shard only, under DDP
                self.nonfinite.raise_if_seen(self.state.step)
                self._log({"split": "gradstats", "step": self.state.step, **grad_stats})

    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None or math.isnan(best):
            return not math.isnan(value)
        return value > best if self.task.valid_mode == "max" else value < best

    def _run_eval(self) -> None:
        self.nonfinite.raise_if_seen(self.state.step)
        if self.averager is not None and self.dist.is_main:
            self.averager.snapshot(self.module.state_dict(), self.state.step)
        metrics = self.evaluate("valid")
        self.state.last_valid = metrics
        value = metrics[self.task.valid_metric]
        if self._improved(value):
            self.state.best_metric = value
            self.state.best_step = self.state.step
            self.state.evals_without_improvement = 0
            self._save_best()
        else:
            self.state.evals_without_improvement += 1
        self._log(
            {
                "split": "valid",
                "step": self.state.step,
                "epoch": self.state.epoch,
                **metrics,
                f"best_{self.task.valid_metric}": self.state.best_metric,
            }
        )
        patience = self.cfg["train"]["patience"]
        if patience and self.state.evals_without_improvement >= patience:
            self.state.stopped_early = True

    def _flush_train_log(self) -> None:
        self.nonfinite.raise_if_seen(self.state.step)
        sums = all_reduce_sums(stats_to_floats(self.state.log_sums), self.device)
        self.state.log_sums = {}
        if sums:
            metrics = self.task.metrics(sums)
            self._log(
                {
                    "split": "train",
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "lr": self.scheduler.get_last_lr()[0],
                    **metrics,
                }
            )
            self._train_postfix = metrics

    def fit(self) -> dict[str, Any]:
        """Train (or resume), then evaluate the best checkpoint; return the final results.

        Torch's thread count, deterministic mode and RNG states are process-wide: they are set
        for the run and restored when it ends, also on error, so that callers running several
        trainers in one process (``demo``, ``analyze``, notebooks) do not inherit them.
        """
        with process_settings(self.cfg["train"], self.device):
            lock = lock_run_dir(self.run_dir) if self.dist.is_main else None
            try:
                self._resume_state = prepare_run_dir(
                    self.run_dir, self.cfg, resume=self.resume, is_main=self.dist.is_main
                )
                return self._fit(self._resume_state is not None)
            finally:
                if lock is not None:
                    lock.close()

    def _fit(self, resume_from_checkpoint: bool) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg["train"]
        if self.dist.is_main:
            write_provenance(
                self.run_dir, self.cfg, self.task.dataset_name, self.device, self.dist.world_size,
                self.argv, resuming=resume_from_checkpoint,
            )

        seed_everything(cfg["seed"])
        self.train_set = self._limited(self.task.dataset("train"))
        self.valid_set = self._limited(self.task.dataset("valid"))
        self.test_set = self._limited(self.task.dataset("test"))
        self.module: nn.Module = self.task.build_model().to(self.device)
        self.model: nn.Module = self.module
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.dist.rank > 0:
            torch.manual_seed(cfg["seed"] + 7919 * self.dist.rank)  # own dropout stream
        self.optimizer = build_optimizer(self.module.parameters(), cfg["optim"])
        keep = int(tcfg["average_checkpoints"])
        self.averager = CheckpointAverager(self.run_dir, keep) if keep > 0 else None
        gradstats_every = int(cfg["analysis"]["gradstats_every"])
        self.grad_recorder = None
        if gradstats_every > 0:
            self.grad_recorder = GradientStatsRecorder(self.module, every=gradstats_every)

        accum = cfg["optim"]["accum_steps"]
        if self.task.examples_are_batches:  # one of the task's own batches per process
            global_batch, batch_key = self.dist.world_size, f"{self.dist.world_size} processes"
        else:
            global_batch = cfg["data"]["batch_size"]
            batch_key = f"data.batch_size={global_batch}"
        micro_per_epoch = len(self.train_set) // global_batch
        self.steps_per_epoch = micro_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the train split has {len(self.train_set)} examples: fewer than one update of "
                f"{batch_key} x optim.accum_steps={accum}"
            )
        total = tcfg["max_epochs"] * self.steps_per_epoch if tcfg["max_epochs"] else 0
        if tcfg["max_steps"]:
            total = min(total, tcfg["max_steps"]) if total else tcfg["max_steps"]
        self.total_steps = total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg["schedule"], cfg["optim"]["lr"], total)
        )
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        if resume_from_checkpoint:
            self._load_last()

        self._train_postfix: dict[str, float] = {}
        bar = None
        if self.show_progress and self.dist.is_main:
            from tqdm import tqdm

            label = norm_label(cfg["model"]["norm"], cfg["model"]["norm_kwargs"])
            bar = tqdm(
                total=total,
                initial=self.state.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"{cfg['task']}/{self.task.dataset_name} {label} seed {cfg['seed']}",
                file=sys.stderr,
            )
        started = time.perf_counter()
        seconds_before = self.state.train_seconds
        self.module.train()
        try:
            while self.state.step < total and not self.state.stopped_early:
                sampler = GlobalBatchSampler(
                    len(self.train_set),
                    global_batch,
                    seed=cfg["seed"],
                    epoch=self.state.epoch,
                    shuffle=self.task.shuffle_train,
                    rank=self.dist.rank,
                    world_size=self.dist.world_size,
                    start_batch=self.state.batch_in_epoch,
                    num_batches=self.steps_per_epoch * accum,
                )
                self.task.begin_train_epoch(self.state.epoch, self.state.batch_in_epoch)
                batches = iter(self._loader(self.train_set, sampler, "train"))
                while self.state.step < total and not self.state.stopped_early:
                    self._optimizer_step([next(batches) for _ in range(accum)])
                    epoch_end = self._after_update(total, accum, started, seconds_before)
                    if bar is not None:
                        self._show_progress(bar)
                    if epoch_end:
                        break
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    def _after_update(self, total: int, accum: int, started: float, seconds_before: float) -> bool:
        """Everything an update is followed by: epoch bookkeeping, the train log line, an
        evaluation when one is due (the final model always gets one) and a checkpoint; return
        whether the update ended the epoch."""
        tcfg, eval_every = self.cfg["train"], self.cfg["train"]["eval_every"]
        epoch_end = self.state.batch_in_epoch >= self.steps_per_epoch * accum
        if epoch_end:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
        step = self.state.step
        if step % tcfg["log_every"] == 0 or step == total or epoch_end:
            self._flush_train_log()
        evaluated = False
        if (eval_every == "epoch" and epoch_end) or (
            eval_every != "epoch" and step % eval_every == 0
        ):
            self._run_eval()
            evaluated = True
        if step == total and not evaluated and self.state.best_step != step:
            self._run_eval()  # the final model is always a candidate
            evaluated = True
        self.state.train_seconds = seconds_before + time.perf_counter() - started
        if evaluated or step % tcfg["checkpoint_every"] == 0 or step == total:
            self._save_last()
        return epoch_end

    def _show_progress(self, bar: Any) -> None:
        bar.update(1)
        post = {}
        if "loss" in self._train_postfix:  # none before the first log line
            post["loss"] = f"{self._train_postfix['loss']:.4f}"
        post["lr"] = f"{self.scheduler.get_last_lr()[0]:.2e}"
        if self.state.last_valid:
            key = self.task.valid_metric
            post[f"valid_{key}"] = f"{self.state.last_valid[key]:.4f}"
        bar.set_postfix(post, refresh=False)

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        self.nonfinite.raise_if_seen(self.state.step)
        self.state.totals = stats_to_floats(self.state.totals)
        averaged_steps: list[int] = []
        if self.averager is not None and self.averager.snapshots():
            averaged, averaged_steps = self.averager.average()
            final = {"model": averaged}
        else:
            final = (
                ckpt.load_checkpoint(self.run_dir / BEST, ["model"])
                if (self.run_dir / BEST).exists()
                else None
            )
        barrier()
        if final is not None:
            self.module.load_state_dict(final["model"])
        valid = self.evaluate("valid")
        test = self.evaluate("test")
        self._log({"split": "test", "step": self.state.best_step, **test})
        results = {
            "task": cfg["task"],
            "dataset": self.task.dataset_name,
            "norm": cfg["model"]["norm"],
            "norm_kwargs": dict(cfg["model"]["norm_kwargs"] or {}),
            "norm_label": norm_label(cfg["model"]["norm"], cfg["model"]["norm_kwargs"]),
            "seed": cfg["seed"],
            "valid_metric": self.task.valid_metric,
            "valid_mode": self.task.valid_mode,
            "test_metric": self.task.test_metric,
            "test_metric_label": self.task.test_metric_label,
            "best_step": self.state.best_step,
            "steps": self.state.step,
            "epochs_completed": self.state.epoch,
            "stopped_early": self.state.stopped_early,
            "train_seconds": round(self.state.train_seconds, 2),
            "world_size": self.dist.world_size,
            "final_model": (
                f"average of the weights at steps {averaged_steps}"
                if averaged_steps
                else "best validation checkpoint"
            ),
            "valid": valid,
            "test": test,
            "train_totals": dict(self.state.totals),
            # Per second of training (evaluation excluded), over all processes: e.g. the
            # target tokens per second of translation, characters per second of LM.
            "train_throughput_per_second": {
                key: value * self.dist.world_size / max(self.state.train_seconds, 1e-9)
                for key, value in self.state.totals.items()
            },
            **self.task.results_extra(),
        }
        if self.dist.is_main:
            self.task.write_artifacts(self.run_dir)
            ckpt.atomic_write_text(self.run_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        barrier()
        return results
