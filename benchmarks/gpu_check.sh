#!/usr/bin/env bash
# GPU check of adanorm's Triton kernels (AdaNorm, DetachNorm): correctness against float64 and
# paired timings against native F.layer_norm, in one run bounded to 5 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
#
# Needs a CUDA build of torch and triton (both ship with the CUDA torch wheels).  Prints the device
# name and the numbers; writes gpu_check.json into $OUT if set, else benchmarks/results/.
# Record the printed device name and numbers in docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 290 python benchmarks/gpu_check.py "$@"
