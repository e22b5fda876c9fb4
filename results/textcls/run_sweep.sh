#!/usr/bin/env bash
# The exact sweep behind results/textcls: RT (seeded 80/10/10 split, split_seed 0) and SST-5
# (official split), 5 norms x 3 seeds, AdaNorm at C = 1 and C = 2, the `cpu` preset, 1 thread.
# Seeds are added one at a time (finished runs are skipped), so an interrupted sweep stays balanced.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ADANORM_DATA="${ADANORM_DATA:-../shared/data}"
OUT="${OUT:-runs/textcls-cpu-sweep}"
for seeds in 1 1,2 1,2,3; do
  adanorm sweep textcls --preset cpu --datasets rt,sst5 \
    --norms layernorm,layernorm-simple,none,detachnorm,adanorm --scales 1,2 \
    --seeds "$seeds" --threads 1 --jobs 1 --out "$OUT" --no-report
done
# choose C on validation, copy the run files, write the reports (not `adanorm report "$OUT"`,
# which would put both C in report.md)
python -m adanorm.lab.select "$OUT" results/textcls
