#!/usr/bin/env bash
# The GPU check of issue #14 in one bounded run (about 6-7 minutes on an H200 with the lab smoke,
# the one-time kernel builds included):
#   1. benchmarks/gpu_check.py: correctness, kernel tuning, paired timings, host enqueue,
#      bandwidth and the end-to-end lm step (bounded to 6 minutes);
#   2. benchmarks/gpu_lab_smoke.py: every task on CUDA under bf16 and fp16 autocast (2.5 minutes).
#
#   bash benchmarks/gpu_check.sh DATA_DIR [--check-only] [gpu_check.py options, e.g. --skip tuning]
#
# --check-only skips the lab smoke (step 2): the kernel builds and gpu_check.py alone, about 4
# minutes on an H200 with --skip tuning (builds ~1 minute, checks and timings ~3).
#
# Needs a CUDA build of torch with triton, and the lab's dependencies.  Writes gpu_check.json,
# gpu_lab_smoke.json and the logs into $OUT if set, else benchmarks/results/.  Record the printed
# device and numbers in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:?usage: bash benchmarks/gpu_check.sh DATA_DIR [--check-only] [gpu_check.py options]}
shift
lab_smoke=1
if [ "${1:-}" = "--check-only" ]; then
    lab_smoke=0
    shift
fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The check is what verifies norm_cuda.cu (adanorm._kernels.CUDA_CPP_VERIFIED), so it asks for the
# C++ kernels explicitly rather than taking auto's choice.
export ADANORM_CUDA_BACKEND=${ADANORM_CUDA_BACKEND:-cuda-cpp}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory \
    --format=csv || true
# Build the CPU and CUDA libraries side by side first (each once per machine), so the checks below
# load them from the cache.
"$py" -c "from adanorm import _kernels; _kernels.cpu_kernels_ready()" &
"$py" -c "from adanorm import _kernels; print('CUDA library:', _kernels.build_cuda_library())" &
wait
timeout 360 "$py" benchmarks/gpu_check.py --json "$out/gpu_check.json" "$@" 2>&1 \
    | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
if [ "$lab_smoke" -eq 1 ]; then
    timeout 150 "$py" benchmarks/gpu_lab_smoke.py --data-dir "$data_dir" \
        --json "$out/gpu_lab_smoke.json" 2>&1 | tee "$out/gpu_lab_smoke.log"
    smoke=${PIPESTATUS[0]}
else
    smoke=0
    echo "lab smoke skipped (--check-only)"
fi
echo "gpu_check exit $check, lab smoke exit $smoke"
[ "$check" -eq 0 ] && [ "$smoke" -eq 0 ]
