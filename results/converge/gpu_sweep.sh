#!/usr/bin/env bash
# The GPU sweep behind results/converge and results/divergence (issue #13), bounded in time.
#
#   bash results/converge/gpu_sweep.sh DATA_DIR SECONDS [MT_CACHE_DIR]
#
# Three lanes run side by side on one GPU, each a chain of `adanorm sweep`s (finished runs are
# skipped, so re-running the script on a machine holding the committed runs continues them):
#   divergence: the deep post-norm Transformer (mt `diverge` preset) for LayerNorm, w/o Norm,
#               DetachNorm and AdaNorm (C = 2, the authors' De-En choice), seeds 1-3, at the
#               paper's warm-up, then with 400 warm-up updates; the four norms side by side, and
#               a run that stopped on a non-finite loss is never re-run;
#   mnist:      the `converge` preset, every norm and AdaNorm at C = 0.5, 1, 2, 3, seeds added
#               one at a time (1, then 1-2, ...) so a cut-off sweep stays balanced;
#   textcls:    the `converge` preset on SST-5 (seeds one at a time), then RT's 10 folds.
#   lm, parsing, mt (later calls: LANES="lm parsing mt"): the `converge` presets, seeds one at a
#               time (LM to 5 seeds, parsing and MT to 3).
# LANES (default "divergence lm parsing": MNIST, SST-5 and RT now run on CPU, see
# results/converge/cpu_sweep.sh and results/mnist_converge/run_sweep.sh) picks the lanes.  After
# SECONDS every lane is stopped; unfinished runs are left for the next call.
set -uo pipefail
cd "$(dirname "$0")/../.."
data=${1:?usage: gpu_sweep.sh DATA_DIR SECONDS [MT_CACHE_DIR]}
budget=${2:?usage: gpu_sweep.sh DATA_DIR SECONDS [MT_CACHE_DIR]}
mt_cache=${3:-}
export ADANORM_DATA=$data OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
ad="${PYTHON:-python3} -m adanorm.lab.cli"
norms=layernorm,adanorm,layernorm-simple,none,detachnorm
cuda=("train.device=${SWEEP_DEVICE:-cuda}")  # SWEEP_DEVICE=cpu: a dry run here
mt_set=("${cuda[@]}" train.progress=false)
[ -n "$mt_cache" ] && mt_set+=("data.cache_dir=$mt_cache")

lane_divergence() {
  # A run that stopped on a non-finite loss is an outcome, not an unfinished run: never re-run it.
  for arm in paper_warmup:8000 short_warmup:400; do
    out="results/divergence/${arm%%:*}/runs"
    for norm in none detachnorm layernorm adanorm; do
      label=$norm scales=()
      [ "$norm" = adanorm ] && label=adanorm_C2 scales=(--scales 2)
      seeds=$(bash results/divergence/missing_seeds.sh "$out/multi30k/$label")
      [ -n "$seeds" ] || continue
      $ad sweep mt --preset diverge --datasets multi30k --norms "$norm" "${scales[@]}" \
        --seeds "$seeds" --jobs 3 --out "$out" --no-report \
        --set "${mt_set[@]}" "schedule.warmup_steps=${arm##*:}" &
    done
    wait
  done
}
lane_mnist() {
  for seeds in 1 1,2 1,2,3 1,2,3,4 1,2,3,4,5; do
    $ad sweep mnist --preset converge --norms $norms --scales 0.5,1,2,3 --seeds "$seeds" \
      --jobs 6 --out results/converge/mnist/runs --no-report --set "${cuda[@]}"
  done
}
lane_textcls() {
  for seeds in 1 1,2 1,2,3 1,2,3,4 1,2,3,4,5; do
    $ad sweep textcls --preset converge --datasets sst5 --norms $norms --scales 0.5,1,2,3 \
      --seeds "$seeds" --jobs 6 --out results/converge/sst5/runs --no-report --set "${cuda[@]}"
  done
  for fold in 0 1 2 3 4 5 6 7 8 9; do
    $ad sweep textcls --preset converge --datasets rt --norms $norms --scales 0.5,1,2,3 \
      --seeds 1 --jobs 6 --out "results/converge/rt_cv10/runs/fold$fold" --no-report \
      --set "${cuda[@]}" data.protocol=cv10 "data.cv_fold=$fold"
  done
}

lane_lm() {
  for seeds in 1 1,2 1,2,3 1,2,3,4 1,2,3,4,5; do
    $ad sweep lm --preset converge --datasets tiny_shakespeare --norms $norms \
      --scales 0.5,1,2,3 --seeds "$seeds" --jobs 8 --out results/converge/lm/runs --no-report \
      --set "${cuda[@]}"
  done
}
lane_parsing() {
  for seeds in 1 1,2 1,2,3; do
    $ad sweep parsing --preset converge --datasets ewt --norms $norms --scales 0.5,1,2,3 \
      --seeds "$seeds" --jobs 8 --out results/converge/parsing/runs --no-report \
      --set "${cuda[@]}"
  done
}
lane_mt() {
  for seeds in 1 1,2 1,2,3; do
    $ad sweep mt --preset converge --datasets multi30k --norms $norms --scales 0.5,1,2,3 \
      --seeds "$seeds" --jobs 8 --out results/converge/mt/runs --no-report --set "${mt_set[@]}"
  done
}

started=$SECONDS
pids=()
for lane in ${LANES:-divergence lm parsing}; do
  setsid bash -c "$(declare -f lane_$lane); $(declare -p ad norms cuda mt_set); lane_$lane" \
    > "results/converge/lane_$lane.log" 2>&1 &
  pids+=($!)
done
while (( SECONDS - started < budget )); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 5
done
for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
sleep 3
for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
echo "gpu_sweep: stopped after $((SECONDS - started)) s"
