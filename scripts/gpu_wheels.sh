#!/usr/bin/env bash
# The wheels scripts/gpu_check.py needs on a GPU machine that has JAX (with CUDA), NumPy, SciPy,
# scikit-image and matplotlib but no network: run here (with network), copy WHEELS over, then
#   pip install --no-index --find-links WHEELS segshare keras nibabel hydra-core omegaconf tqdm
# (pip takes from WHEELS only what the machine lacks; --no-deps below keeps JAX and NumPy theirs).
set -euo pipefail
out=${1:?usage: gpu_wheels.sh WHEELS_DIR}
mkdir -p "$out"
python -m pip download --no-deps --only-binary=:all: -d "$out" \
    keras absl-py namex optree h5py rich markdown-it-py mdurl pygments ml-dtypes packaging \
    nibabel hydra-core omegaconf "antlr4-python3-runtime==4.9.3" pyyaml tqdm
python -m pip wheel --no-deps -w "$out" "$(dirname "$0")/.."
ls "$out"
