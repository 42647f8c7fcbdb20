#!/usr/bin/env bash
# Build .gpu/ (ignored by git) for scripts/gpu_check.sh: the wheels the lent GPU image lacks, and a
# synthetic default tile, so the GPU machine (no internet, minutes of time) only installs and measures.
#
#   bash scripts/gpu_bundle.sh            # on this CPU machine, in the project root (~2 min)
#   then, with the device tool: run `OUT=$OUT bash scripts/gpu_check.sh` with carry [".gpu"]
#
# The image it was written for (../shared/tools/device-check-example.sh): Python 3.12, torch 2.11 +
# CUDA 13, nvcc, transformers/accelerate/safetensors/huggingface_hub/numpy/scipy present; gsplat,
# diffusers, plyfile, tyro (and their small pure-Python dependencies) and torchao absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${GPU_PYTHON_VERSION:-3.12}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
mkdir -p .gpu/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl gsplat==1.5.3 diffusers==0.42.1 plyfile==1.1.5 tyro==1.0.16 importlib_metadata \
  docstring-parser typeguard torchao
if [ ! -f .gpu/tile/transforms_train.json ]; then
  rm -rf .gpu/tile
  OMP_NUM_THREADS=1 python3 -m skyfall synth .gpu/tile --preset default
fi
du -sh .gpu/whl .gpu/tile
echo "carry [\".gpu\"] (under the device tool's 64 MiB) and run: OUT=\$OUT bash scripts/gpu_check.sh"
