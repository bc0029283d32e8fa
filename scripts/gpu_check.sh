#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU: the vLLM-vs-transformers parity tests and the
# throughput table of both backends on the built-in SmolLM2-135M (64 GSM8K test rows, fp32).
#   bash scripts/gpu_check.sh          (from the repository root, ../shared/data beside it)
# `make setup` installs the CUDA build of vLLM when nvidia-smi works. Takes about 5 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
make setup
.venv/bin/python -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'vllm', vllm.__version__)"
.venv/bin/python -m pytest -q -rs tests/test_vllm_backend.py tests/test_hf_scorer.py
.venv/bin/python scripts/bench.py --backends cuda
