#!/usr/bin/env bash
# Issue 18, item 4: the `cpu` preset on Tiny Shakespeare (LayerNorm) in both training modes,
# data.train_mode=stream (memory carried across updates, the presets' default) and warmup (memory
# rebuilt per shuffled window by one gradient-free segment), seeds 1 and 2.  Each seed's two
# modes run at the same time (1 thread each), so they share the machine's load.  Finished runs
# are skipped; the per-run records are copied to results/lm/train_modes/runs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code
OUT="${OUT:-runs/lm-train-modes}"
train() {  # mode seed
  local dir="$OUT/$1/seed$2"
  [ -f "$dir/results.json" ] && return 0
  python -m adanorm.lab.cli train lm --preset cpu --threads 1 --no-progress --run-dir "$dir" \
    --resume --set data.train_mode="$1" seed="$2"
}
for seed in 1 2; do
  train stream "$seed" & stream_pid=$!
  train warmup "$seed" & warmup_pid=$!
  wait "$stream_pid" "$warmup_pid"
  for mode in stream warmup; do
    mkdir -p "results/lm/train_modes/runs/$mode/seed$seed"
    cp "$OUT/$mode/seed$seed"/{results.json,metrics.jsonl,config.yaml,run.json} \
      "results/lm/train_modes/runs/$mode/seed$seed/"
  done
done
python results/lm/train_modes_table.py "results/lm/train_modes/runs"
