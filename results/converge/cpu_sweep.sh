#!/usr/bin/env bash
# The CPU columns of results/converge (issue #13): text classification trained to convergence on
# this project's CPU machine, one torch thread per run.
#
#   results/converge/cpu_sweep.sh sst5|rt      (JOBS=2: two runs side by side; default 1)
#
# sst5: stage 1 runs every norm and AdaNorm at C = 0.5, 1, 2, 3 (k = 0.1) for seeds 1-3, a seed
#       at a time so an interrupted sweep stays balanced; C is then chosen on validation over the
#       seeds every C ran (python -m adanorm.lab.select), and stage 2 runs seeds 4 and 5 of the
#       four norms and AdaNorm at that C.
# rt:   the 10-fold cross-validation (data.protocol=cv10): every norm and every C on fold 0, then
#       fold 1, ... (seed 1; the folds are the replicates); C is chosen over the folds.
# Finished runs are skipped, so re-running the script resumes it; the tables are written last:
#   python -m adanorm.lab.select results/converge/<column>_cpu/runs results/converge/<column>_cpu
set -euo pipefail
cd "$(dirname "$0")/../.."
column=${1:?usage: cpu_sweep.sh sst5|rt}
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
export OMP_NUM_THREADS=1
ADANORM="${ADANORM:-adanorm}"   # e.g. ADANORM="python -m adanorm.lab.cli" from a source tree
JOBS="${JOBS:-1}"
norms=layernorm,adanorm,layernorm-simple,none,detachnorm
out="results/converge/${column}_cpu"
sweep() {
  $ADANORM sweep textcls --preset converge --threads 1 --jobs "$JOBS" --no-report \
    --norms "$norms" "$@"
}
case "$column" in
  sst5)
    for seeds in 1 1,2 1,2,3; do
      sweep --datasets sst5 --scales 0.5,1,2,3 --seeds "$seeds" --out "$out/runs"
    done
    chosen=$(python -m adanorm.lab.select "$out/runs" "$out" | sed -n 's/^sst5: AdaNorm C = \([0-9.]*\).*/\1/p')
    [ -n "$chosen" ] || { echo "cpu_sweep.sh: no C chosen for sst5" >&2; exit 1; }
    for seeds in 1,2,3,4 1,2,3,4,5; do
      sweep --datasets sst5 --scales "$chosen" --seeds "$seeds" --out "$out/runs"
    done
    ;;
  rt)
    for fold in 0 1 2 3 4 5 6 7 8 9; do
      sweep --datasets rt --scales 0.5,1,2,3 --seeds 1 --out "$out/runs/fold$fold" \
        --set data.protocol=cv10 "data.cv_fold=$fold"
    done
    ;;
  *) echo "cpu_sweep.sh: unknown column $column (sst5 or rt)" >&2; exit 2 ;;
esac
python -m adanorm.lab.select "$out/runs" "$out"
