#!/usr/bin/env bash
# The GPU check (issue 14) on one CUDA GPU: the CUDA random-state replay tests, bf16 and
# fp16 + GradScaler cached steps against full batch, the memory curve of a BERT-base-size encoder
# (cached vs full until full runs out of memory), cached / plain step time at chunk 32-256, one
# tiled InfoNCE cached step at B = 1,048,576, and the JAX cached step and tiled loss on the GPU.
# All of it is benchmarks/gpu_check.py (see its docstring); this wrapper checks for CUDA, sets the
# paths and keeps the run under a time limit. It writes one results file, $OUT/gpu_check.md, and
# the run's log next to it ($OUT defaults to benchmarks/results). About 5-8 minutes on an H200.
# Run from anywhere, on a machine whose python3 has CUDA torch (JAX with CUDA for section 6):
#     bash benchmarks/gpu_check.sh
#     OUT=/tmp/check bash benchmarks/gpu_check.sh
# Without a GPU, `python3 benchmarks/gpu_check.py --smoke` runs the CPU parts at tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
# the library, gradcache_cli and the benchmarks it reuses come from this checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# a hard stop short of 10 minutes: each section appends to the results file as it finishes, so a
# run cut short still returns every section it finished
timeout --signal=INT --kill-after=15 "${GPU_CHECK_LIMIT:-570}" \
    "$PYTHON" benchmarks/gpu_check.py --out "$OUT/gpu_check.md" "$@" 2>&1 | tee "$OUT/gpu_check.log"
