#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md still lacks, in one command for a machine with a CUDA GPU.
#
#   bash scripts/gpu_figures.sh [OUT_DIR] [PART ...]     PART: tests crf maskcut model train kmeans unsam (default: all)
#
# Each part writes OUT_DIR/<part>.json (and .log) and is bounded to a few minutes on an H100, so a session
# with a short GPU lease can run the parts one call at a time. Random seeded weights and the embedded
# synthetic dataset: nothing is downloaded. Pass real DINO weights through MASKCUT_WEIGHTS=/path/dino.pth
# to make the MaskCut precision figure meaningful.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_figures}"
shift || true
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests crf maskcut model train kmeans unsam)
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
export CUTLER_DATASETS="${CUTLER_DATASETS:-$OUT/datasets}"
PY="${PYTHON:-python}"

"$PY" - <<'EOF' || { echo "no CUDA device: these figures need a GPU"; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1 || true

run() {  # name, command...
  local name="$1"; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s (log: $OUT/$name.log)"
}

weights=()
[ -n "${MASKCUT_WEIGHTS:-}" ] && weights=(--pretrain_path "$MASKCUT_WEIGHTS")

for part in "${PARTS[@]}"; do
  case "$part" in
    tests)    # the CUDA-only tests (GPU CRF against the CPU path)
      run tests "$PY" -m pytest -q -rs tests/test_torch_crf.py -k cuda ;;
    crf)      # torch CRF masks/s at 480x480 (lattice and exact Gaussian), agreement with pydensecrf
      run crf "$PY" scripts/bench_crf.py --size 480 --gpu-images 32 --masks-per-image 3 --workers 8 --threads 0 \
          --json "$OUT/crf.json" ;;
    maskcut)  # end to end ViT-B/8 480 px N=3 with each CRF mode, NCut agreement, bf16-vs-float32 masks
      run maskcut "$PY" scripts/bench_maskcut.py --num-images 64 --batch-size 32 --num-workers 8 --crf-workers 8 \
          --published-images 2 \
          --crf torch pydensecrf --dtype-agreement "${weights[@]}" --json "$OUT/maskcut.json" ;;
    model)    # Mask R-CNN R50-FPN forward / forward+backward, ours vs torchvision
      run model "$PY" scripts/bench_model.py --device cuda --batch-sizes 1 2 4 8 --iters 5 --warmup 2 \
          --json "$OUT/model.json" ;;
    train)    # data loader img/s with copy-paste, and training it/s
      run train "$PY" scripts/bench_train.py --workers 0 4 8 --batches 20 --ims-per-batch 8 --num-images 64 \
          --train-iters 20 --train-ims-per-batch 2 --config-file cutler/imagenet_cascade_r0.yaml --json "$OUT/train.json" ;;
    kmeans)   # U2Seg K-means: torch on the GPU (resident, streamed) vs faiss and scikit-learn on the CPU
      run kmeans "$PY" scripts/bench_kmeans.py --device cuda --num-points 500000 --dim 768 --clusters 800 --iters 10 \
          --threads 16 --json "$OUT/kmeans.json" ;;
    unsam)    # UnSAM conquer: batched merging vs the sequential reference, ViT-B/8 256 px crops, agreement
      run unsam "$PY" scripts/bench_unsam.py --device cuda --num-crops 512 --batch-size 128 --reference-crops 16 \
          --root "$OUT/unsam_datasets" --json "$OUT/unsam.json" ;;
    *) echo "unknown part '$part' (tests crf maskcut model train kmeans unsam)"; exit 2 ;;
  esac
done
echo "figures in $OUT/: record them in BENCHMARKS.md with the device in $OUT/device.txt"
