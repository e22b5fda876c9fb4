"""Time per update of the lm task's two training modes, paired in one process (issue 18).

``data.train_mode=stream`` (memory carried across updates) and ``warmup`` (one gradient-free
segment per example rebuilds the memory) are timed in alternating blocks of updates in the same
process and thread, so both see the same machine load; each update is what the trainer does
(fetch the batch, loss, backward, clip, Adam step).  Both the wall-clock time and the process's
CPU time are measured: on a shared machine the CPU time of a 1-thread process is the steadier
of the two (it does not count the time the process waits for a core).  Prints Markdown tables.

    PYTHONPATH=src python results/lm/time_train_modes.py --preset cpu --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch

from adanorm.lab.config import load_config
from adanorm.lab.samplers import GlobalBatchSampler
from adanorm.lab.tasks.lm.task import TRAIN_MODES, LMTask

MODES = TRAIN_MODES  # ("stream", "warmup")


def update_seconds(
    mode: str, preset: str, overrides: list[str], data_dir: str | None, seed: int
) -> Iterator[tuple[float, float]]:
    """(wall, CPU) seconds of each successive training update in ``mode`` (first epoch)."""
    cfg = load_config("lm", preset, [*overrides, f"data.train_mode={mode}", f"seed={seed}"])
    torch.manual_seed(seed)
    task = LMTask(cfg, data_dir)
    model = task.build_model().train()
    o = cfg["optim"]
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
                                 eps=o["eps"])
    train = task.dataset("train")
    sampler = GlobalBatchSampler(len(train), cfg["data"]["batch_size"], seed=seed, epoch=0,
                                 shuffle=task.shuffle_train)
    task.begin_train_epoch(0, 0)
    for indices in sampler:
        started, cpu_started = time.perf_counter(), time.process_time()
        batch = task.collate(train.__getitems__(indices), "train")
        loss, _ = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.batch_size=1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10, help="untimed updates per mode first")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-updates", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams = {m: update_seconds(m, args.preset, args.set, args.data_dir, args.seed)
               for m in MODES}
    for mode in MODES:
        for _ in range(args.warmup):
            next(streams[mode])
    blocks: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(args.blocks):
        for mode in MODES:
            times = [next(streams[mode]) for _ in range(args.block_updates)]
            blocks[mode].append((sum(t[0] for t in times) / len(times),
                                 sum(t[1] for t in times) / len(times)))
    print(f"preset {args.preset} {' '.join(args.set)}, {args.threads} thread(s), "
          f"{args.blocks} alternating blocks of "
          f"{args.block_updates} updates per mode after {args.warmup} untimed ones")
    for index, clock in enumerate(("wall", "CPU")):
        print(f"\n| mode | {clock} ms / update (median of block means) | min | max |")
        print("| --- | ---: | ---: | ---: |")
        for mode in MODES:
            ms = [1000 * b[index] for b in blocks[mode]]
            print(f"| {mode} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} |")
        ratios = [w[index] / s[index]
                  for s, w in zip(blocks["stream"], blocks["warmup"], strict=True)]
        print(f"\n{clock}: warmup / stream time per update, median over block pairs "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f} to {max(ratios):.3f})")


if __name__ == "__main__":
    main()
