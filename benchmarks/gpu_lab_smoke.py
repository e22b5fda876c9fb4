"""The lab on a GPU: every task's ``smoke`` preset for a few dozen updates on CUDA, under bf16
autocast and under fp16 autocast (with GradScaler), with AdaNorm in every norm slot (``--norm``),
checking that every logged loss is finite.

Each run executes in its own process with ``torch.cuda.set_sync_debug_mode("warn")``, so every
host synchronization is reported; the script counts them and records where they came from, to show
that the update loop itself does not synchronize (syncs should scale with logging and
evaluation, not with updates).

    python benchmarks/gpu_lab_smoke.py --data-dir DIR [--steps 40] [--json PATH]

Runs the tasks in parallel processes (one GPU is plenty for smoke-sized models).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("mnist", "textcls", "mt", "lm", "parsing", "digits")
AMPS = ("bf16", "fp16")

_RUNNER = (
    "import sys, torch, warnings; warnings.simplefilter('always'); "
    "torch.cuda.is_available() and torch.cuda.set_sync_debug_mode('warn'); "
    "from adanorm.lab.cli import main; sys.argv = ['adanorm'] + sys.argv[1:]; main()"
)


def run_one(
    task: str, amp: str, steps: int, data_dir: str, root: Path, device: str, norm: str
) -> dict:
    run_dir = root / f"{task}-{amp}"
    command = [
        sys.executable, "-c", _RUNNER, "train", task, "--preset", "smoke", "--no-progress",
        "--data-dir", data_dir, "--run-dir", str(run_dir), "--set", f"train.device={device}",
        f"model.norm={norm}",
        f"train.amp={amp}", f"train.max_steps={steps}", "train.max_epochs=0",
        "train.log_every=10", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
    ]
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    record = {"task": task, "amp": amp, "norm": norm, "returncode": done.returncode,
              "seconds": round(time.time() - start, 1)}
    sync_sites = re.findall(r"^(.*?):(\d+): UserWarning: called a synchronizing", done.stderr,
                            flags=re.MULTILINE)
    record["sync_warnings"] = len(sync_sites)
    sites: dict[str, int] = {}
    for path, line in sync_sites:
        key = f"{path.split('/src/')[-1]}:{line}"
        sites[key] = sites.get(key, 0) + 1
    record["sync_sites"] = sites
    losses = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            entry = json.loads(line)
            for key, value in entry.items():
                if key.endswith("loss") and isinstance(value, (int, float)):
                    losses.append(value)
    record["losses"] = losses
    record["ok"] = (done.returncode == 0 and bool(losses)
                    and all(math.isfinite(v) for v in losses))
    if not record["ok"]:
        record["stderr_tail"] = done.stderr[-3000:]
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--amps", default=",".join(AMPS))
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument("--norm", default="adanorm", help="model.norm of every run")
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks/results")
    parser.add_argument("--json", type=Path, default=default_dir / "gpu_lab_smoke.json")
    args = parser.parse_args()
    jobs = [(task, amp) for task in args.tasks.split(",") for amp in args.amps.split(",")]
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(run_one, task, amp, args.steps, args.data_dir, Path(tmp),
                               args.device, args.norm)
                   for task, amp in jobs]
        records = [f.result() for f in futures]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"steps": args.steps, "runs": records}, indent=1))
    for r in records:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['task']:<8} {r['amp']} rc={r['returncode']} "
              f"{r['seconds']:>5} s, {len(r['losses'])} losses logged, last "
              f"{r['losses'][-1] if r['losses'] else None}, host syncs {r['sync_warnings']}")
        if r["sync_sites"]:
            top = sorted(r["sync_sites"].items(), key=lambda kv: -kv[1])[:4]
            print("      syncs at " + ", ".join(f"{k} x{v}" for k, v in top))
        if not r["ok"]:
            print("      " + r.get("stderr_tail", "")[-1500:].replace("\n", "\n      "))
    print(f"lab smoke on CUDA: {sum(r['ok'] for r in records)}/{len(records)} runs ok")
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
