#!/usr/bin/env bash
# The checks a GPU user's vLLM paths need, on a machine with one or more NVIDIA GPUs (no network needed once
# installed): parity with transformers (V2 runner on and off, eager and compiled, IEEE fp32 matmuls), bf16 with
# its expected gap, tensor parallelism 2 vs 1 under a timeout, a 152k vocabulary with 2,048-token rows at high
# memory utilisation, and a throughput table. One PASS/FAIL line per check; benchmarks/gpu_check.md gets the
# table, which `make bench` puts into BENCHMARKS.md.
#   bash scripts/gpu_check.sh          (from the repository root, ../shared/data beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
make setup
.venv/bin/python -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'vllm', vllm.__version__)"
.venv/bin/python scripts/gpu_check.py
