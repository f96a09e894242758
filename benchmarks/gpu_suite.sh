#!/usr/bin/env bash
# The benchmark set on a GPU machine, as recorded in docs/benchmarks.md: feature extraction
# (GoogLeNet, bf16 + channels_last as the stage runs on CUDA; direct TIFF decoding vs OpenSlide),
# the patch data path, and tiling with every core. Results go to $1 (default reports/bench).
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
set -euo pipefail
out=${1:-reports/bench}
mkdir -p "$out"
n=$(nproc)
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# 20 demo slides listed 6 times (symlinks): ~20k tiles, a run of seconds rather than a blip
"$py" benchmarks/extraction.py --arch googlenet --patients 4 --copies 6 --tile-workers "$n" \
    --repeats 2 --workers "8,$((n - 1))" --readers auto,openslide --out "$out/extraction_gpu.json"
"$py" benchmarks/data_path.py --workers "0,2,8" --repeats 1 --out "$out/data_path_gpu.json"
"$py" benchmarks/tiling.py --workers "$n" --out "$out/tiling_gpu.json"
