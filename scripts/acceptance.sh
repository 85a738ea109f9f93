#!/usr/bin/env bash
# Acceptance runs of issue 3: toy-naive, 3 seeds, default (non-smoke) settings. Pretraining is timed separately.
set -e
export INFUSING_KIT_CACHE=${INFUSING_KIT_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1 TQDM_DISABLE=1
for s in ${SEEDS:-0 1 2}; do
  /usr/bin/time -f "pretrain seed $s: %e s" .venv/bin/python -m infusing_kit pretrain --seed $s
  /usr/bin/time -f "toy-naive seed $s: %e s" .venv/bin/python -m infusing_kit experiment --preset toy-naive --seed $s --out runs/accept/toy-naive-s$s --registry runs/accept/results.jsonl
done
