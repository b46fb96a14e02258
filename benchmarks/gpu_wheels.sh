#!/usr/bin/env bash
# Run HERE (a machine with the package registry) before borrowing a GPU: downloads into benchmarks/.wheels the
# wheels that run_gpu.sh needs beside the GPU image's own torch (the image has no registry). Then carry them:
#   bash benchmarks/gpu_wheels.sh          # ~30 MB; GPU_PYTHON=3.12 (the image's Python), TORCHAO=0.18.0 by default
#   run(command="bash benchmarks/run_gpu.sh $OUT", carry=["benchmarks/.wheels"])
# run_gpu.sh installs them with --no-index into benchmarks/.site (on PYTHONPATH), leaving the image untouched.
# torchao (fp8 training) must suit the image's torch: set TORCHAO to the release made for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-3.12}
DEST=benchmarks/.wheels
mkdir -p "$DEST"
# what the Trainer imports that torch does not bring: PyYAML, tqdm, matplotlib (and its own dependencies),
# psutil; torchao for memory.precision=fp8-mixed
python3 -m pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  pyyaml tqdm matplotlib cycler fonttools kiwisolver pillow pyparsing python-dateutil six contourpy packaging psutil \
  "torchao==${TORCHAO:-0.18.0}"
du -sh "$DEST"
ls "$DEST"
