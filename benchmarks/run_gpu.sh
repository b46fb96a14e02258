#!/usr/bin/env bash
# Every GPU benchmark of issue 16 in one go, in under 10 minutes:   bash benchmarks/run_gpu.sh [OUTDIR]
# Needs a CUDA machine with torch; runs from the checkout without installing (PYTHONPATH). The wheels it needs beside
# torch come from benchmarks/.wheels (made by benchmarks/gpu_wheels.sh where a registry is; carry that folder).
# Each line's timeout is its share of the 10 minutes; results and logs go to OUTDIR, a summary to OUTDIR/gpu.txt.
# Not in the 10 minutes (run it after, if device time is left): python3 benchmarks/cp_attention.py --out OUTDIR
# (context parallelism's CausalBias against the boolean mask its compiled path uses).
set -u
OUT=${1:-${OUT:-gpu_results}}; mkdir -p "$OUT"
SITE=$PWD/benchmarks/.site
if [ -d benchmarks/.wheels ] && [ ! -d "$SITE" ]; then
  python3 -m pip install --quiet --no-index --no-deps --target "$SITE" benchmarks/.wheels/*.whl \
    || echo "run_gpu: installing the carried wheels failed; going on with the image's packages"
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
  git log -1 --format='code %h %s' 2>/dev/null; } | tee "$OUT/gpu.txt"
# 1. the Trainer against the raw compiled loop (GPT-2 small), blocks vs whole-model compile, host profiles
timeout 180 python3 benchmarks/overhead_gpu.py --out "$OUT" \
  --only anchor_raw_compiled,st_raw_compiled,trainer_compiled,trainer_compiled_model \
  --host-profile trainer_compiled,trainer_compiled_model 2>&1 | tee "$OUT/overhead_gpu.log"
# 2. a ~1B llama: MFU, bf16 vs fp8 (tensorwise, rowwise), against its raw compiled loop
timeout 180 python3 benchmarks/llama_gpu.py --out "$OUT" 2>&1 | tee "$OUT/llama_gpu.log"
# 3. memory per checkpointing policy, measured against the estimate: eager (selective as a run does it, and
#    selective-eager) and compiled
timeout 90 python3 benchmarks/memory_gpu.py --precisions bf16-mixed --out "$OUT" 2>&1 | tee "$OUT/memory_gpu.log"
timeout 90 python3 benchmarks/memory_gpu.py --compile --precisions bf16-mixed --out "$OUT" 2>&1 \
  | tee "$OUT/memory_gpu_compiled.log"
# 4. the chunked loss against full logits on CUDA
timeout 45 python3 benchmarks/loss_speed.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/loss_speed.log"
