#!/usr/bin/env bash
# Every GPU benchmark in one go, as recorded in RESULTS.md:   bash benchmarks/run_gpu.sh [OUTDIR]
# Needs a CUDA machine with torch; runs from the checkout without installing (PYTHONPATH).
set -u
OUT=${1:-${OUT:-gpu_results}}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } | tee "$OUT/gpu.txt"
timeout 330 python3 benchmarks/overhead_gpu.py --out "$OUT" 2>&1 | tee "$OUT/overhead_gpu.log"
timeout 150 python3 benchmarks/memory_gpu.py --all-precisions --out "$OUT" 2>&1 | tee "$OUT/memory_gpu.log"
timeout 200 python3 benchmarks/memory_gpu.py --compile --precisions bf16-mixed --out "$OUT" 2>&1 | tee "$OUT/memory_gpu_compiled.log"
timeout 90 python3 benchmarks/scaling_cpu.py --only "1 process" --device auto --steps 20 --json "$OUT/scaling_gpu.json" 2>&1 | tee "$OUT/scaling_gpu.log"
timeout 90 python3 benchmarks/loss_speed.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/loss_speed.log"
