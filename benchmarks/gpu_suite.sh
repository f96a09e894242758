#!/usr/bin/env bash
# The benchmark set on a GPU machine, as recorded in docs/benchmarks.md, sized for ~5 minutes of
# device time on one H200 (16 cores) once the venv is installed:
# - feature extraction, GoogLeNet (bf16 + channels_last, as the stage runs on CUDA), CAMELYON-
#   like 10-mm slides (~700 tiles each): model only vs end to end vs data path only, JPEG decoded
#   by the workers (extractor.decode: cpu) and by nvJPEG on the GPU (decode: device);
# - the same for a ViT-B/16 encoder (timm) when timm is installed;
# - the E2E step in bf16 autocast vs fp32 against the fp64 reference, chunk sizes 32-512;
# - the GPU-only tests (nvJPEG vs libjpeg-turbo pixels);
# - last, capped at 120 s so a slow compile cannot push the suite past its budget:
#   extractor.compile false vs true (torch.compile/inductor of the GoogLeNet forward), device
#   decode, a smaller project (5 slides x 2 copies).
# Every extraction row also counts slide-handle opens (each slide by one DataLoader worker).
# Results go to $1 (default reports/bench; copy what is worth keeping to docs/bench/).
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
set -euo pipefail
out=${1:-reports/bench}
mkdir -p "$out"
n=$(nproc)
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -m pytest -q tests/test_jpegtiles.py 2>&1 | tail -3 | tee "$out/gpu_tests.txt"
# 10 slides of 10 mm listed 4 times (symlinks): ~28k tiles
"$py" benchmarks/extraction.py --arch googlenet --patients 2 --slide-mm 10 --copies 4 \
    --tile-workers "$n" --repeats 2 --workers "$((n - 1))" --decodes cpu,device \
    --out "$out/extraction_gpu.json"
if "$py" -c "import timm" 2>/dev/null; then
  "$py" benchmarks/extraction.py --arch timm:vit_base_patch16_224 --patients 2 --slide-mm 10 \
      --copies 1 --tile-workers "$n" --repeats 1 --workers "$((n - 1))" --decodes cpu,device \
      --out "$out/extraction_vitb_gpu.json"
fi
"$py" benchmarks/e2e_precision.py --device cuda --arch googlenet --n 1024 \
    --chunks 32,64,128,256,512 --repeats 3 --out "$out/e2e_precision_gpu.json"
timeout 120 "$py" benchmarks/extraction.py --arch googlenet --patients 1 --slide-mm 10 \
    --copies 2 --tile-workers "$n" --repeats 1 --workers "$((n - 1))" --decodes device \
    --compiles false,true --out "$out/extraction_compile_gpu.json" \
  || echo "extraction compile run stopped (rc $?): over its 120 s cap or failed" \
  | tee "$out/extraction_compile_gpu.txt"
