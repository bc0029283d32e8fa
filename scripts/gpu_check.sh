#!/usr/bin/env bash
# The GPU check on a machine with an NVIDIA GPU and no network (the lent one: torch 2.11, transformers 5.17, no vLLM):
# installs the wheels scripts/gpu_wheels.sh fetched (.gpu/wheels) offline into a temporary folder, puts the project's
# source on the path, and runs scripts/gpu_check.py with the machine's own torch and transformers. One PASS/FAIL/SKIP
# line per check; benchmarks/gpu_check.md gets the table, which `make bench` puts into BENCHMARKS.md.
#   bash scripts/gpu_check.sh             on the GPU machine (about 5 minutes on an H200)
#   bash scripts/gpu_check.sh --dry-run   the same checks on CPU at toy shapes, offline (a test runs it)
# PYTHON picks the interpreter (default python3: on the lent machine, the one that holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=""
case "${1:-}" in
  "") ;;
  --dry-run) DRY=--dry-run ;;
  *) echo "unknown option $1 (--dry-run)" >&2; exit 2 ;;
esac
GPU=${CURATE_GPU_DIR:-.gpu}
ls "$GPU"/wheels/*.whl >/dev/null 2>&1 && [ -f "$GPU/tokenizer/tokenizer.json" ] ||
  { echo "$GPU has no wheels or tokenizer: run bash scripts/gpu_wheels.sh first, where pip reaches the registry" >&2; exit 2; }
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU here (try --dry-run)"; exit 1; }
fi
SITE=$(mktemp -d "${TMPDIR:-/tmp}/q-curate-site.XXXXXX")
trap 'rm -rf "$SITE"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$GPU"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CURATE_GPU_DIR="$GPU"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
"$PY" scripts/gpu_check.py $DRY
