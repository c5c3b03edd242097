#!/usr/bin/env bash
# The device check of issue 11, in one command, on a machine with a CUDA GPU (under 6 minutes on one H200):
# the CUDA-sensitive tests, then both throughput benchmarks, printing their figures.
#
# Needs no network and no install: a Python with torch and torchvision (other versions than pyproject.toml
# pins will do), numpy, pillow, safetensors, pyyaml, scipy, scikit-learn, scikit-image, matplotlib, tqdm
# and pytest; this source tree (run with PYTHONPATH=src, set here); and the packed crops (15 MiB), made
# where the corpora are with:  python benchmarks/pack_crops.py --out gpu-check-data
#
# Usage: benchmarks/gpu_check.sh [CROPS_DIR]        (default: gpu-check-data; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-gpu-check-data}")
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export FACEGENDER_CACHE=$(mktemp -d) FACEGENDER_BENCH_DATA="$DATA"
trap 'rm -rf "$FACEGENDER_CACHE"' EXIT

if [ ! -d "$DATA/train" ]; then
  echo "gpu_check: no packed crops at $DATA; make them where ../shared/data is: python benchmarks/pack_crops.py --out $DATA" >&2
  exit 2
fi
"$PY" - <<'PYEOF'
import sys, torch, torchvision
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU; this check is for a GPU machine")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
PYEOF
start=$SECONDS
echo "== CUDA-sensitive tests (seeded runs and --resume with --deterministic, augmentation and cache on the GPU)"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_transforms.py tests/test_loaders.py \
  -k "seed or resume or device or written or bad_files" || status=$?
echo "== training throughput (reference and default side by side; the curve over batch sizes; --deterministic)"
timeout 150 "$PY" benchmarks/train_throughput.py --images 3000 --seconds 8 --batch-sizes 64,128,256,512 --deterministic
echo "== inference throughput"
timeout 90 "$PY" benchmarks/infer_throughput.py --images 512 --seconds 5
echo "gpu_check: $((SECONDS - start)) s; tests $([ "${status:-0}" = 0 ] && echo passed || echo FAILED)"
exit "${status:-0}"
