#!/bin/bash
# The exact commands behind results/parsing/ (run from the repository root, 1 torch thread per run,
# one run at a time on a 2-core machine shared with other jobs).
set -euo pipefail

# The sweep, seed-major (every norm gets seed 1 before any gets seed 2).  `adanorm sweep` skips
# finished runs, so each call adds one seed for the five norms.
for s in 1 2 3; do
  adanorm sweep parsing --preset cpu --norms layernorm,adanorm,layernorm-simple,none,detachnorm \
    --seeds $s --datasets ewt --data-dir /work/shared/data --out runs/sweep-parsing --threads 1 \
    --no-report
done

# The engine's table / CSV / all-norm loss curves, and figure 2 (AdaNorm vs LayerNorm).
adanorm report runs/sweep-parsing --out results/parsing
python -m adanorm.lab.tasks.parsing.plots runs/sweep-parsing \
  results/parsing/figure2_loss_adanorm_vs_layernorm.png --dataset ewt

# The small per-run files (no checkpoints) are copied next to the report.
for d in runs/sweep-parsing/ewt/*/seed*; do
  dest=results/parsing/runs/$(basename "$(dirname "$d")")/$(basename "$d")
  mkdir -p "$dest"
  cp "$d"/{results.json,metrics.jsonl,config.yaml,run.json,train.log} "$dest"/
done

# The longer LayerNorm / AdaNorm pair (6 epochs, seed 1) for the figure-2 question.
adanorm sweep parsing --preset cpu --set train.max_epochs=6 --norms layernorm,adanorm --seeds 1 \
  --datasets ewt --data-dir /work/shared/data --out runs/long-parsing --threads 1 --no-report
python -m adanorm.lab.tasks.parsing.plots runs/long-parsing \
  results/parsing/figure2_long_6epochs_seed1.png --dataset ewt
# (its run files are copied to results/parsing/runs/long_6epochs/<norm>/seed1 the same way)

# Regenerate report.md / report.csv / loss_curves_ewt_{1,2}.png from the committed runs above (the
# 6-epoch pair is its own column, labelled train.max_epochs=6):
adanorm report results/parsing/runs --out results/parsing
