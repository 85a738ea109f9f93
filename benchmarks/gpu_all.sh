#!/usr/bin/env bash
# Every GPU measurement of the scale issue in one call (one H200: about 8 minutes). Run from the repo root:
#   bash benchmarks/gpu_all.sh [OUT_DIR]          # on the GPU machine
#   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_all.sh  # the same script, tiny sizes, to check it on a CPU first
# Prints, in one log: kit/bare train-step ratio (toy-clip, ViT-B-16; goal >= 0.9), every regularizer's step time vs
# naive (goal: full combination <= 1.10x), the same with torch.compile, images/s of the full method for ViT-B-16
# and ViT-B-16-SigLIP at 224 px fed by the JPEG pipeline (goal >= 3,000 img/s, bf16) with the loader ratio and
# teacher-extraction img/s, and the kNN time for a 100k index and 10k queries.
set -u
OUT=${1:-runs/gpu-bench}; DEVICE=${DEVICE:-cuda}; mkdir -p "$OUT"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -n "${SMOKE:-}" ]; then
  B=16; S=6; IMG=64; BIG="ViT-B-32@64"; SIG="ViT-B-16-SigLIP@32"; KNN="--sizes 2000 --queries 200"; W=1
else
  B=128; S=30; IMG=8192; BIG="ViT-B-16"; SIG="ViT-B-16-SigLIP"; KNN="--sizes 100000 --queries 10000"; W=$(( $(nproc) - 2 ))
fi
run() { echo; echo "### $*"; "$@" 2>&1 | grep -v -i "warn"; }
{
  run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  run $PY benchmarks/bench_train_step.py --models toy-clip "$BIG" --batch $B --steps $S --device "$DEVICE"
  run $PY benchmarks/bench_train_step.py --models toy-clip "$BIG" --batch $B --steps $S --device "$DEVICE" --compile --skip-regularizers
  run $PY benchmarks/bench_pipeline.py --model "$BIG" --images $IMG --batch $B --steps $S --device "$DEVICE" --workers $W --method full
  run $PY benchmarks/bench_pipeline.py --model "$SIG" --images $IMG --batch $B --steps $S --device "$DEVICE" --workers $W --method full
  run $PY benchmarks/bench_knn.py $KNN
} | tee "$OUT/gpu_all.log"
echo "log: $OUT/gpu_all.log"
