#!/usr/bin/env bash
# The exact sweep behind results/mt: Multi30k De->En, the `cpu` preset, 5 norms x 2 seeds
# (AdaNorm at the library default C = 1), 1 thread per run, 2 runs at a time.  Seed 1 of every
# norm runs before any seed 2, so an interrupted sweep stays balanced (finished runs are skipped;
# rerunning the script resumes unfinished ones from their last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
OUT="${OUT:-runs/mt-cpu-sweep}"
for seeds in 1 1,2; do
  adanorm sweep mt --preset cpu \
    --norms layernorm,layernorm-simple,none,detachnorm,adanorm \
    --seeds "$seeds" --threads 1 --jobs 2 --out "$OUT" --no-report
done
# Per-run records (no checkpoints) go next to the report, which is written from them.
find "$OUT" -name results.json | while read -r f; do
  run="$(dirname "$f")"; dest="results/mt/runs/${run#"$OUT"/}"
  mkdir -p "$dest"
  cp "$run"/{results.json,metrics.jsonl,config.yaml,run.json,translations.test.txt,translations.test.tok.txt} "$dest"/
done
adanorm report results/mt/runs --out results/mt
