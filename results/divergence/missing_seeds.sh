#!/usr/bin/env bash
# The seeds of one divergence configuration still to run, as a list for `adanorm sweep --seeds`:
#
#   bash results/divergence/missing_seeds.sh results/divergence/paper_warmup/runs/multi30k/detachnorm
#
# prints e.g. "2,3," (a trailing comma keeps a single seed a list: "3" alone means seeds 1-3), or
# nothing when every seed 1-3 finished or stopped on a non-finite training loss: that stop is an
# outcome of the experiment, so such a run is never re-run.  Used by results/converge/gpu_sweep.sh
# and results/converge/cpu_sweep.sh.
set -euo pipefail
config=${1:?usage: missing_seeds.sh RUNS_DIR/multi30k/NORM_LABEL}
seeds=""
for seed in 1 2 3; do
  run="$config/seed$seed"
  [ -f "$run/results.json" ] && continue
  grep -qs "non-finite training loss" "$run/train.log" && continue
  seeds+="$seed,"
done
echo "$seeds"
