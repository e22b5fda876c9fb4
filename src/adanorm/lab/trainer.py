"""The training loop shared by every task.

The :class:`Trainer` knows nothing about images, text or parsing: it asks the
:class:`~adanorm.lab.task.Task` for datasets, the model, the loss and the metrics, and provides the
rest — seeding, AMP, gradient accumulation and clipping, lr schedules, periodic evaluation, early
stopping, best-checkpoint selection, atomic checkpoints with exact resume, DDP, a progress bar and
``metrics.jsonl``.

Run directory layout (written by the main process only)::

    config.yaml          the resolved config
    run.json             git commit, seed, library versions, device, world size, command line
    metrics.jsonl        one JSON object per train log / evaluation / final test line
    checkpoint_last.pt   everything needed to resume (model, optimizer, scheduler, RNG, counters)
                         and the task's own training state (``Task.state_dict``), e.g. the LM's
                         memory; other DDP processes keep their RNG and task state in
                         ``rng_rank<r>_step<s>.pt`` / ``task_state_rank<r>_step<s>.pt``
    checkpoint_best.pt   the model with the best validation metric
    checkpoint_avg_<step>.pt  with ``train.average_checkpoints`` N > 0: the weights at each of
                         the last N evaluations, averaged into the final model
    results.json         final valid and test metrics of the best (or averaged) model, training
                         totals and throughput (e.g. target tokens per second); marks a finished
                         run

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)`` (shuffled, or
in index order for a task with ``shuffle_train = False``); a checkpoint
records the position inside the epoch, every RNG state and the byte length of ``metrics.jsonl``.
Resuming truncates ``metrics.jsonl`` to that length and replays the remaining steps, so a run that
was killed and resumed writes exactly the lines an uninterrupted run writes.  A ``metrics.jsonl``
shorter than recorded (lost lines) is refused; a resumed run without a checkpoint starts over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..analysis import GradientStatsRecorder
from . import checkpoint as ckpt
from .config import ConfigError, check_resume, dump_yaml, resolve
from .distributed import DistInfo, all_reduce_sums, barrier, init_distributed
from .runinfo import environment, git_state, norm_label
from .schedules import lr_multiplier
from .task import Stats, Task, add_stats, get_task, stats_to_floats

__all__ = [
    "Trainer",
    "RunDirError",
    "TrainingOutOfMemoryError",
    "GlobalBatchSampler",
    "seed_everything",
    "resolve_device",
]

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
RESULTS = "results.json"
SNAPSHOT_PREFIX = "checkpoint_avg_"
METRICS = "metrics.jsonl"


class RunDirError(RuntimeError):
    """The run directory is in a state that the requested action would damage."""


class TrainingOutOfMemoryError(MemoryError):
    """The device ran out of memory in a training step or an evaluation; the message says which
    config value to lower."""


def _is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; torch's CPU allocator a plain RuntimeError.
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return device


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of one epoch, identical for any number of processes.

    The epoch's permutation depends only on ``(seed, epoch)``.  It is cut into global batches of
    ``global_batch`` indices (the incomplete last one is dropped), and process ``rank`` of
    ``world_size`` takes the ``rank``-th equal slice of each.  DDP averages gradients over
    processes, so the update equals that of one process on the whole global batch.
    ``start_batch`` skips the batches already consumed before a resume.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"data.batch_size={global_batch} is not divisible by the {world_size} processes"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.rank, self.world_size = rank, world_size
        full = num_examples // global_batch
        self.num_batches = full if num_batches is None else min(num_batches, full)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_examples, generator=generator)
        else:
            order = torch.arange(self.num_examples)
        for b in range(self.start_batch, self.num_batches):
            lo = b * self.global_batch + self.rank * self.local_batch
            yield order[lo : lo + self.local_batch].tolist()


class _ShardSampler(Sampler[list[int]]):
    """Evaluation batches over this process's contiguous shard of a split (nothing dropped)."""

    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int) -> None:
        per = math.ceil(num_examples / world_size)
        self.lo, self.hi = min(rank * per, num_examples), min((rank + 1) * per, num_examples)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for lo in range(self.lo, self.hi, self.batch_size):
            yield list(range(lo, min(lo + self.batch_size, self.hi)))


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


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _process_settings(tcfg: Mapping[str, Any], device: torch.device) -> Iterator[None]:
    """Apply the run's process-wide torch settings; restore the previous ones on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    rng = ckpt.capture_rng()
    try:
        torch.set_num_threads(int(tcfg["threads"]) or 1)
        if tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        ckpt.restore_rng(rng)


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
        self._first_nonfinite_step: torch.Tensor | None = None
        self._first_nonfinite_loss: torch.Tensor | None = None
        self._resume_state: dict[str, Any] | None = None

    # --- setup ----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        o = self.cfg["optim"]
        name = o["name"]
        if name == "adam":
            return torch.optim.Adam(
                params,
                lr=o["lr"],
                betas=tuple(o["betas"]),
                eps=o["eps"],
                weight_decay=o["weight_decay"],
            )
        if name == "adamw":
            return torch.optim.AdamW(
                params,
                lr=o["lr"],
                betas=tuple(o["betas"]),
                eps=o["eps"],
                weight_decay=o["weight_decay"],
            )
        if name == "sgd":
            return torch.optim.SGD(
                params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
            )
        raise ConfigError(f"unknown optim.name {name!r}; choose adam, adamw or sgd")

    def _lock_run_dir(self) -> None:
        """Refuse a second trainer in the same directory (e.g. two sweeps over one output).

        The lock is an advisory ``flock`` on ``.lock``: the OS drops it when the process dies,
        even by ``kill -9``, so a crashed run never leaves a stale lock behind.
        """
        self._lock_file = None
        if not self.dist.is_main:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / ".lock", "a")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirError(
                f"another process is training in {self.run_dir} (it holds {self.run_dir}/.lock)"
            ) from None
        self._lock_file = handle

    def _unlock_run_dir(self) -> None:
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            self._lock_file = None

    def _prepare_run_dir(self) -> bool:
        """Check the run directory; return True if a checkpoint should be resumed."""
        last = self.run_dir / LAST
        if (self.run_dir / RESULTS).exists():
            raise RunDirError(f"{self.run_dir} already holds a finished run ({RESULTS} exists)")
        if self.resume:
            if last.exists():
                if (self.run_dir / "config.yaml").exists():
                    check_resume(self.run_dir / "config.yaml", self.cfg)
                self._resume_state = self._checked_last_checkpoint()
                return True
            self._drop_lines_without_checkpoint()
            return False
        if last.exists() or (self.run_dir / METRICS).exists():
            raise RunDirError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                f"another --run-dir"
            )
        return False

    def _checked_last_checkpoint(self) -> dict[str, Any]:
        """The last checkpoint, refused unless ``metrics.jsonl`` still holds every line it saw.

        Those lines come from training that the checkpoint cannot replay: a shorter file (lost
        lines) or one whose recorded length does not end a line (a replaced file) cannot be
        resumed exactly, and extending it would write NUL bytes that break every reader.
        """
        state = ckpt.load_checkpoint(
            self.run_dir / LAST,
            required=("model", "optimizer", "scheduler", "trainer", "rng", "metrics_bytes"),
        )
        recorded = int(state["metrics_bytes"])
        path = self.run_dir / METRICS
        size = path.stat().st_size if path.exists() else 0
        ends_a_line = recorded == 0
        if 0 < recorded <= size:
            with open(path, "rb") as fh:
                fh.seek(recorded - 1)
                ends_a_line = fh.read(1) == b"\n"
        if size < recorded or not ends_a_line:
            raise RunDirError(
                f"{path} has {size} bytes but {LAST} (step {state['trainer']['step']}) recorded "
                f"{recorded} bytes ending a line: lines written before that checkpoint were lost "
                f"or the file was replaced, so the run cannot be resumed exactly; restore "
                f"{METRICS}, or delete {self.run_dir} and train again"
            )
        return state

    def _drop_lines_without_checkpoint(self) -> None:
        """A resumed run without a checkpoint starts over at step 0, replaying every line."""
        path = self.run_dir / METRICS
        if self.dist.is_main and path.exists() and path.stat().st_size:
            print(
                f"{self.run_dir}: no {LAST} yet, so the run starts over; dropping the "
                f"{METRICS} lines of the attempt that stopped before its first checkpoint",
                file=sys.stderr,
            )
            with open(path, "r+b") as fh:
                fh.truncate(0)

    def _write_provenance(self, resuming: bool) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        info = {
            "task": self.cfg["task"],
            "dataset": self.task.dataset_name,
            "seed": self.cfg["seed"],
            "git": git_state(),
            "environment": environment(self.device),
            "world_size": self.dist.world_size,
            "command": self.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # A run.json left by an attempt that never reached a checkpoint describes nothing that
        # survives: a fresh start replaces it; only a resumed checkpoint gets run.resumed.json.
        name = "run.resumed.json" if resuming else "run.json"
        ckpt.atomic_write_text(self.run_dir / name, json.dumps(info, indent=2) + "\n")

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
        self._raise_if_nonfinite()
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
            ckpt.atomic_save(
                {
                    "format": "adanorm-lab-best/1",
                    "model": self.module.state_dict(),
                    "step": self.state.step,
                    "valid": dict(self.state.last_valid),
                    "config": json.loads(json.dumps(self.cfg)),
                },
                self.run_dir / BEST,
            )

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

    def _loader(self, dataset: Dataset, sampler: Sampler[list[int]]) -> DataLoader:
        # A private generator: creating a DataLoader iterator draws a seed from its generator,
        # and drawing from the global one would shift dropout masks after a resume.
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.task.collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(0),
        )

    def _eval_batches(self, dataset: Dataset) -> Iterator[Any]:
        sampler = _ShardSampler(
            len(dataset), self.cfg["data"]["eval_batch_size"], self.dist.rank, self.dist.world_size
        )
        for batch in self._loader(dataset, sampler):
            yield _move(batch, self.device)

    def _out_of_memory(self, during: str, exc: BaseException) -> TrainingOutOfMemoryError:
        data, accum = self.cfg["data"], self.cfg["optim"]["accum_steps"]
        if during == "training":
            key = "max_tokens" if "max_tokens" in data else "batch_size"
            advice = (
                f"lower data.{key} (now {data[key]}) and raise optim.accum_steps (now {accum}) "
                f"by the same factor to keep the update"
            )
        else:
            key = "eval_max_tokens" if "eval_max_tokens" in data else "eval_batch_size"
            advice = f"lower data.{key} (now {data[key]})"
        what = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return TrainingOutOfMemoryError(
            f"out of memory on {self.device} during {during} at step {self.state.step} ({what}); "
            f"{advice}, or train.amp=bf16, or a smaller model"
        )

    def evaluate(self, split: str) -> dict[str, float]:
        dataset = self.valid_set if split == "valid" else self.test_set
        was_training = self.module.training
        self.module.eval()
        try:
            return self.task.evaluate(
                self.module,
                self._eval_batches(dataset),
                lambda stats: all_reduce_sums(stats_to_floats(stats), self.device),
                self._autocast,
            )
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise self._out_of_memory(f"{split} evaluation", exc) from exc
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
            self._note_nonfinite(loss.detach())
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
            if _is_out_of_memory(exc):
                raise self._out_of_memory("training", exc) from exc
            raise

    def _update(self, micro_batches: list[Any]) -> None:
        accum = len(micro_batches)
        recording = (
            self.grad_recorder.step(self.state.step)
            if self.grad_recorder is not None
            else contextlib.nullcontext()
        )
        with recording:
            for i, batch in enumerate(micro_batches):
                stats = self._micro_step(
                    _move(batch, self.device), sync=i == accum - 1, scale=1 / accum
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
                self._raise_if_nonfinite()
                self._log({"split": "gradstats", "step": self.state.step, **grad_stats})

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first update whose loss was not finite.

        Checking ``isfinite`` on the host would wait for the device every micro-step; the flag is
        read by :meth:`_raise_if_nonfinite` only where the trainer synchronizes anyway (logs,
        evaluations, checkpoints), so no log line, best model or checkpoint comes from a run
        past a non-finite loss.
        """
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._first_nonfinite_loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = (self._first_nonfinite_step < 0) & ~torch.isfinite(loss)
        self._first_nonfinite_step = torch.where(first, self.state.step, self._first_nonfinite_step)
        self._first_nonfinite_loss = torch.where(
            first, loss.to(torch.float64), self._first_nonfinite_loss
        )

    def _raise_if_nonfinite(self) -> None:
        if self._first_nonfinite_step is None:
            return
        step = int(self._first_nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"non-finite training loss {float(self._first_nonfinite_loss)} at step {step} "
                f"(noticed at step {self.state.step}); try a lower optim.lr, "
                f"optim.clip_norm > 0 or train.amp=none"
            )

    def _improved(self, value: float) -> bool:
        best = self.state.best_metric
        if best is None or math.isnan(best):
            return not math.isnan(value)
        return value > best if self.task.valid_mode == "max" else value < best

    def _snapshot_for_average(self) -> None:
        """Keep the weights of the last ``train.average_checkpoints`` evaluations."""
        keep = int(self.cfg["train"]["average_checkpoints"])
        if keep <= 0 or not self.dist.is_main:
            return
        ckpt.atomic_save(
            {"format": "adanorm-lab-snapshot/1", "model": self.module.state_dict(),
             "step": self.state.step},
            self.run_dir / f"{SNAPSHOT_PREFIX}{self.state.step:09d}.pt",
        )
        for old in self._snapshots()[:-keep]:
            old.unlink()

    def _snapshots(self) -> list[Path]:
        return sorted(self.run_dir.glob(f"{SNAPSHOT_PREFIX}*.pt"))

    def _averaged_model(self) -> dict[str, torch.Tensor]:
        """The element-wise mean of the kept snapshots (floating tensors; others from the last)."""
        paths = self._snapshots()
        states = [ckpt.load_checkpoint(path, ["model", "step"])["model"] for path in paths]
        averaged = {}
        for key, value in states[-1].items():
            if torch.is_floating_point(value):
                total = sum(state[key].double() for state in states)
                averaged[key] = (total / len(states)).to(value.dtype)
            else:
                averaged[key] = value
        self._averaged_steps = [int(ckpt.load_checkpoint(p)["step"]) for p in paths]
        return averaged

    def _run_eval(self) -> None:
        self._raise_if_nonfinite()
        self._snapshot_for_average()
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
        self._raise_if_nonfinite()
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
        with _process_settings(self.cfg["train"], self.device):
            self._lock_run_dir()
            try:
                return self._fit(self._prepare_run_dir())
            finally:
                self._unlock_run_dir()

    def _fit(self, resume_from_checkpoint: bool) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg["train"]
        self._write_provenance(resume_from_checkpoint)

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
        self.optimizer = self._build_optimizer(self.module.parameters())
        gradstats_every = int(cfg["analysis"]["gradstats_every"])
        self.grad_recorder = (
            GradientStatsRecorder(self.module, every=gradstats_every)
            if gradstats_every > 0
            else None
        )

        accum = cfg["optim"]["accum_steps"]
        global_batch = cfg["data"]["batch_size"]
        micro_per_epoch = len(self.train_set) // global_batch
        self.steps_per_epoch = micro_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the train split has {len(self.train_set)} examples: fewer than one update of "
                f"data.batch_size={global_batch} x optim.accum_steps={accum}"
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
        eval_every = tcfg["eval_every"]
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
                batches = iter(self._loader(self.train_set, sampler))
                while self.state.step < total and not self.state.stopped_early:
                    self._optimizer_step([next(batches) for _ in range(accum)])
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
                    if bar is not None:
                        bar.update(1)
                        post = {}
                        if "loss" in self._train_postfix:  # none before the first log line
                            post["loss"] = f"{self._train_postfix['loss']:.4f}"
                        post["lr"] = f"{self.scheduler.get_last_lr()[0]:.2e}"
                        if self.state.last_valid:
                            key = self.task.valid_metric
                            post[f"valid_{key}"] = f"{self.state.last_valid[key]:.4f}"
                        bar.set_postfix(post, refresh=False)
                    if epoch_end:
                        break
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        self._raise_if_nonfinite()
        self.state.totals = stats_to_floats(self.state.totals)
        average = int(cfg["train"]["average_checkpoints"])
        self._averaged_steps: list[int] = []
        if average > 0 and self._snapshots():
            final = {"model": self._averaged_model()}
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
                f"average of the weights at steps {self._averaged_steps}"
                if self._averaged_steps
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
