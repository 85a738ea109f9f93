#!/usr/bin/env bash
# Hyper-parameter search for every regularizer preset on a GPU machine, then the chosen configuration
# with 3 seeds (test metrics), plus the step-time benchmark. Usage (from the repo root):
#   bash benchmarks/gpu_search.sh OUT_DIR [TRIALS_1D] [TRIALS_2D] [PARALLEL] [SMOKE]
# Needs the toy VLMs of seeds 0-2 in $INFUSING_KIT_CACHE (python -m infusing_kit pretrain --seed N).
# Each preset searches in its own process and SQLite file; whatever finished is summarised at the end.
set -u
OUT=${1:?output folder}; T1=${2:-6}; T2=${3:-10}; PAR=${4:-8}; SMOKE=${5:-}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export OMP_NUM_THREADS=2 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PRESETS=$(python3 -c "from infusing_kit.protocol.experiment import PRESETS; print(' '.join(p for p, v in PRESETS.items() if v.search))")
one() {
  p=$1; n=$T1; [ "$p" = toy-paper ] && n=$T2
  python3 -m infusing_kit search --preset "$p" --trials "$n" --device "$DEVICE" $SMOKE --storage "$OUT/db/$p.db" \
    --out "$OUT/runs/$p" --final-seeds 0 1 2 --registry "$OUT/registry/$p.jsonl" > "$OUT/logs/$p.log" 2>&1 \
    && echo "done $p" || echo "FAILED $p (see $OUT/logs/$p.log)"
}
export -f one; export OUT T1 T2 DEVICE SMOKE
mkdir -p "$OUT/db" "$OUT/logs" "$OUT/registry"
( for s in 0 1 2; do python3 -m infusing_kit experiment --preset toy-naive --seed $s --device "$DEVICE" $SMOKE \
    --out "$OUT/runs/toy-naive/s$s" --registry "$OUT/registry/toy-naive.jsonl" > "$OUT/logs/toy-naive-s$s.log" 2>&1; done
  for s in 0 1 2; do python3 -m infusing_kit experiment --preset toy-wise-ft --seed $s --device "$DEVICE" $SMOKE \
    --out "$OUT/runs/toy-wise-ft/s$s" --registry "$OUT/registry/toy-wise-ft.jsonl" > "$OUT/logs/toy-wise-ft-s$s.log" 2>&1; done
  echo "done toy-naive toy-wise-ft" ) &
echo $PRESETS | tr ' ' '\n' | xargs -P "$PAR" -I{} bash -c 'one {}'
wait
cat "$OUT"/registry/*.jsonl > "$OUT/results.jsonl" 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
best = {}
for log in sorted(glob.glob(f"{out}/logs/*.log")):
    text = open(log).read()
    i = text.find('{\n "preset"')
    if i >= 0:
        j = text.find("\n}", i)
        d = json.loads(text[i:j + 2]); best[d["preset"]] = d
json.dump(best, open(f"{out}/chosen.json", "w"), indent=1)
print(json.dumps({k: (v["params"], round(v["value"], 4)) for k, v in best.items()}, indent=1))
PY
python3 -m infusing_kit report --registry "$OUT/results.jsonl" --figures "$OUT/figures" ${SMOKE:+--smoke} || true
