#!/usr/bin/env bash
# Acceptance runs of issues 3 and 4: toy-naive and toy-paper, 3 seeds, default (non-smoke) settings, on this machine.
# Pretraining is timed separately (cached per seed). Choose with PRESETS="toy-paper" SEEDS="0 1 2".
# Each run refuses to overwrite its folder; the registry runs/accept/results.jsonl gets one row per run.
set -e
export INFUSING_KIT_CACHE=${INFUSING_KIT_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1 TQDM_DISABLE=1
for s in ${SEEDS:-0 1 2}; do
  /usr/bin/time -f "pretrain seed $s: %e s" .venv/bin/python -m infusing_kit pretrain --seed $s
  for p in ${PRESETS:-toy-naive toy-paper}; do
    /usr/bin/time -f "$p seed $s: %e s" .venv/bin/python -m infusing_kit experiment --preset $p --seed $s \
      --out runs/accept/$p-s$s --registry runs/accept/results.jsonl
  done
done
