#!/usr/bin/env bash
# What the GPU check needs on the lent GPU machine and that machine lacks, into .gpu/ (ignored by git), for
# `device.run(..., carry=[".gpu"])`: the wheels of pydantic and its three helpers for that machine's Python and
# platform (it has torch, transformers, pyarrow, numpy, typer, rich, fsspec, pyyaml and regex; scoring imports no
# polars), and the built-in model's tokenizer files (not its 98 MB weights: the check builds models there). Prints
# the total, which must stay under the 64 MiB a run may carry with the repository.
#   bash scripts/gpu_wheels.sh                         # for the lent GPU machine (Python 3.12, x86-64)
#   bash scripts/gpu_wheels.sh --python-version 3.11   # for another Python (the dry-run test uses this machine's)
# Needs the registry and `make setup` (the pinned versions and the tokenizer come from .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=3.12
DEST=.gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    *) echo "unknown option $1 (--python-version X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "$PY not found: run make setup first (versions and the tokenizer come from it)" >&2; exit 2; }
# the versions this checkout is tested with: pydantic pins its pydantic-core exactly
PINS=$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
rm -rf "$DEST/wheels" "$DEST/tokenizer"
mkdir -p "$DEST/wheels"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/wheels" $PINS
"$PY" - "$DEST/tokenizer" <<'PYTHON'
import sys
from transformers import AutoTokenizer
from curate.models import ensure_builtin
AutoTokenizer.from_pretrained(ensure_builtin()).save_pretrained(sys.argv[1])
PYTHON
ours=$(du -sb "$DEST" | cut -f1)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$DEST: $(ls "$DEST/wheels" | tr '\n' ' ')+ tokenizer: $((ours / 1024)) KiB; with the repository $(((ours + repo) / 1048576)) MiB of the 64 MiB a run carries"
[ $((ours + repo)) -lt $((64 * 1048576)) ] || { echo "over 64 MiB: the run would be refused" >&2; exit 1; }
