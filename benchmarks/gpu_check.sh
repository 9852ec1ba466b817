#!/usr/bin/env bash
# The tiled-loss headline on one GPU (issue 5): one complete torch cached_step with the tiled
# InfoNCE at B = 1,048,576, d = 128, where one dense B x B float32 matrix alone would take 4 TiB.
# Prints its time and peak allocated GPU memory against the floor (representations + gradients).
# Run from the repository root on a machine whose python3 has CUDA torch:
#     bash benchmarks/gpu_check.sh            (about a minute or two on an H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
# the library and gradcache_cli (bench_losses.py reads memory through gradcache_cli.memory)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# a warm-up size first: shows the scaling and catches problems in seconds
python3 benchmarks/bench_losses.py --headline --device cuda --rows 131072 --chunk 65536
python3 benchmarks/bench_losses.py --headline --device cuda --rows 1048576 --chunk 65536
