#!/usr/bin/env bash
# The exact sweep behind results/mnist_converge: the `converge` preset (early stopping on
# validation accuracy, best checkpoint restored), one torch thread, one run at a time.
# Stage 1: every norm and AdaNorm at C = 0.5, 1, 2, 3 (k = 0.1), seeds added one at a time so
# an interrupted sweep stays balanced.  Stage 2: C chosen on validation over stage 1's seeds
# (choose_c.py), then seeds 4 and 5 for the chosen C and the other norms.  Finished runs are
# skipped, so re-running this script resumes it.  JOBS=2 runs two at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
export OMP_NUM_THREADS=1
ADANORM="${ADANORM:-adanorm}"   # e.g. ADANORM="python -m adanorm.lab.cli" from a source tree
JOBS="${JOBS:-1}"               # runs side by side (one thread each)
OUT=results/mnist_converge/runs
for seeds in 1 1,2 1,2,3; do
  $ADANORM sweep mnist --preset converge \
    --norms layernorm,adanorm,layernorm-simple,none,detachnorm --scales 0.5,1,2,3 \
    --seeds "$seeds" --threads 1 --jobs "$JOBS" --out "$OUT" --no-report
done
C=$(python results/mnist_converge/choose_c.py "$OUT" results/mnist_converge/C_selection.md)
for seeds in 1,2,3,4 1,2,3,4,5; do
  $ADANORM sweep mnist --preset converge \
    --norms layernorm,adanorm,layernorm-simple,none,detachnorm --scales "$C" \
    --seeds "$seeds" --threads 1 --jobs "$JOBS" --out "$OUT" --no-report
done
python results/mnist_converge/choose_c.py "$OUT" results/mnist_converge/C_selection.md >/dev/null
$ADANORM report "$OUT" --out results/mnist_converge
