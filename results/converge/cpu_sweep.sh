#!/usr/bin/env bash
# The CPU columns of results/converge (issue #13): trained to convergence on this project's CPU
# machine, one torch thread per run unless THREADS says otherwise.
#
#   results/converge/cpu_sweep.sh sst5|rt|lm|parsing|mt  (JOBS=2: two runs side by side; default 1)
#   JOBS=1 THREADS=2 results/converge/cpu_sweep.sh mt    (one run at a time on both cores: for a
#       run too long to finish inside one working period at 1 thread; train.threads only changes
#       the summation order, so such runs pool with the 1-thread ones)
#
# sst5, lm: stage 1 runs every norm and AdaNorm at C = 0.5, 1, 2, 3 (k = 0.1) for seeds 1-3, a
#           seed at a time so an interrupted sweep stays balanced; C is then chosen on validation
#           over the seeds every C ran (python -m adanorm.lab.select), and stage 2 runs seeds 4
#           and 5 of the four norms and AdaNorm at that C.
# parsing:  stage 1 only (3 seeds is the column's count): every norm and every C, seeds 1-3.
# mt:       stage 1 at seed 1 only (every norm and every C), C chosen on that seed's validation
#           loss, then stage 2 runs seeds 2 and 3 of the four norms and AdaNorm at the chosen C:
#           18 runs, not 24.  A run is the `converge` preset's 3+3 pre-norm Transformer, bf16
#           autocast, about 1,400 target tokens per second at 1 thread: 1.3-3 hours (AdaNorm
#           C = 3 longer), resumable every 250 updates within a working period (checkpoints are
#           not committed); JOBS=1 THREADS=2 gives a run about 1.6 times the updates per
#           second of 1 thread alone (a 130 s probe, see README.md).
# rt:       the 10-fold cross-validation (data.protocol=cv10): every norm and every C on fold 0,
#           then fold 1, ... (seed 1; the folds are the replicates); C is chosen over the folds.
# divergence: results/divergence's deep post-norm Transformer (preset mt/diverge: 6+6 layers of
#           width 512, 600 updates of ~8K tokens, bf16 autocast) for the runs no GPU call made:
#           DetachNorm, AdaNorm (C = 2) and w/o Norm, then LayerNorm, seeds 1-3, each only where
#           its seed has neither finished nor stopped on a non-finite loss (that is an outcome,
#           never re-run).  ARM=short_warmup:400 runs the second arm instead of paper_warmup:8000.
#           Checkpoints every 50 updates, so a run cut off by the end of a working period resumes
#           while its working tree survives.  The table: python results/divergence/analyze.py
#           results/divergence (each seed's device is a column of it).
# Finished runs are skipped, so re-running the script resumes it; the tables are written last:
#   python -m adanorm.lab.select results/converge/<column>_cpu/runs results/converge/<column>_cpu
set -euo pipefail
cd "$(dirname "$0")/../.."
column=${1:?usage: cpu_sweep.sh sst5|rt|lm|parsing|mt|divergence}
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
THREADS="${THREADS:-1}"
export OMP_NUM_THREADS="$THREADS"
ADANORM="${ADANORM:-adanorm}"   # e.g. ADANORM="python -m adanorm.lab.cli" from a source tree
JOBS="${JOBS:-1}"
norms=layernorm,adanorm,layernorm-simple,none,detachnorm
out="results/converge/${column}_cpu"
sweep() {  # sweep TASK DATASET [adanorm sweep options...]
  local task=$1 dataset=$2
  shift 2
  $ADANORM sweep "$task" --preset converge --datasets "$dataset" --threads "$THREADS" --jobs "$JOBS" \
    --no-report --norms "$norms" "$@"
}
staged() {  # staged TASK DATASET FINAL_SEEDS CHOICE_SEEDS: every C at seeds 1..CHOICE_SEEDS,
            # then every norm and the chosen C to FINAL_SEEDS
  local task=$1 dataset=$2 final=$3 choice=$4 seed chosen
  for ((seed = 1; seed <= choice; seed++)); do
    sweep "$task" "$dataset" --scales 0.5,1,2,3 --seeds "$(seq -s, 1 "$seed")" --out "$out/runs"
  done
  [ "$final" -gt "$choice" ] || return 0
  chosen=$(python -m adanorm.lab.select "$out/runs" "$out" --require-scales 0.5,1,2,3 \
    | sed -n "s/^$dataset: AdaNorm C = \([0-9.]*\).*/\1/p")
  [ -n "$chosen" ] || { echo "cpu_sweep.sh: no C chosen for $dataset" >&2; exit 1; }
  for ((seed = choice + 1; seed <= final; seed++)); do
    sweep "$task" "$dataset" --scales "$chosen" --seeds "$(seq -s, 1 "$seed")" --out "$out/runs"
  done
}
divergence() {  # the runs of results/divergence/<arm>/runs that no device has made yet
  local arm=${ARM:-paper_warmup:8000} norm label seeds scales
  local out="results/divergence/${arm%%:*}/runs"
  for norm in detachnorm adanorm none layernorm; do
    label=$norm scales=()
    [ "$norm" = adanorm ] && label=adanorm_C2 scales=(--scales 2)
    seeds=$(bash results/divergence/missing_seeds.sh "$out/multi30k/$label")
    [ -n "$seeds" ] || continue
    # A run that stops on a non-finite loss fails the sweep; any other failure stops this script.
    $ADANORM sweep mt --preset diverge --datasets multi30k --norms "$norm" "${scales[@]}" \
      --seeds "$seeds" --threads "$THREADS" --jobs "$JOBS" --out "$out" --no-report \
      --set train.device=cpu train.progress=false train.checkpoint_every=50 \
      "schedule.warmup_steps=${arm##*:}" || true
    seeds=$(bash results/divergence/missing_seeds.sh "$out/multi30k/$label")
    [ -z "$seeds" ] || {
      echo "cpu_sweep.sh: $out/multi30k/$label seeds $seeds neither finished nor stopped on a non-finite loss; see their train.log" >&2
      exit 1
    }
  done
  python results/divergence/analyze.py results/divergence
}
case "$column" in
  divergence) divergence; exit 0 ;;
  sst5) staged textcls sst5 5 3 ;;
  lm) staged lm tiny_shakespeare 5 3 ;;
  parsing) staged parsing ewt 3 3 ;;
  mt) staged mt multi30k 3 1 ;;
  rt)
    for fold in 0 1 2 3 4 5 6 7 8 9; do
      sweep textcls rt --scales 0.5,1,2,3 --seeds 1 --out "$out/runs/fold$fold" \
        --set data.protocol=cv10 "data.cv_fold=$fold"
    done
    ;;
  *) echo "cpu_sweep.sh: unknown column $column (sst5, rt, lm, parsing, mt or divergence)" >&2; exit 2 ;;
esac
python -m adanorm.lab.select "$out/runs" "$out"
