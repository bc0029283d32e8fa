"""`bash scripts/gpu_check.sh --dry-run`: the GPU check's own script, on CPU at toy shapes, in an environment like the
lent GPU machine's (torch, transformers, pyarrow, numpy, typer, rich, fsspec, pyyaml, regex; no polars, pydantic,
vLLM or datasets), with nothing but the wheels scripts/gpu_wheels.sh fetched, installed offline."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .clients.venvs import cache_root
from .conftest import ROOT

# What the lent machine's image holds that q-curate's scoring uses (the device tool's KINDS.md lists it).
GPU_IMAGE = ["torch==2.13.0", "transformers", "pyarrow", "numpy", "typer", "rich", "fsspec", "pyyaml", "regex"]


def gpu_like_venv() -> Path:
    """A venv with the GPU image's packages only, built once under the cache folder (its stamp written last)."""
    import transformers

    wanted = [p if p != "transformers" else f"transformers=={transformers.__version__}" for p in GPU_IMAGE]
    folder = cache_root() / f"gpu-image-{hashlib.sha256(' '.join(wanted).encode()).hexdigest()[:10]}"
    if (folder / ".q-curate-ready").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *wanted], check=True)
    # typer >= 0.2x requires pydantic, which the GPU image does not have: as there, it is not installed
    uninstall = [str(folder / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y"]
    subprocess.run([*uninstall, "pydantic", "pydantic-core", "annotated-types", "typing-inspection"], check=True)
    (folder / ".q-curate-ready").write_text("\n".join(wanted))
    return folder


@pytest.mark.slow
def test_the_gpu_check_runs_offline_with_only_the_carried_wheels(tmp_path, smollm2_dir):
    python = gpu_like_venv() / "bin" / "python"
    code = (
        "import importlib.util as u; print([m for m in ('polars', 'pydantic', 'vllm', 'datasets') if u.find_spec(m)])"
    )
    assert subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip() == "[]"

    carried = tmp_path / "gpu"
    version = ".".join(platform.python_version_tuple()[:2])
    fetched = subprocess.run(
        ["bash", "scripts/gpu_wheels.sh", "--python-version", version, "--dest", str(carried)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert "of the 64 MiB a run carries" in fetched.stdout
    assert sum(f.stat().st_size for f in carried.rglob("*") if f.is_file()) < 16 * 2**20

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PYTHON": str(python),
        "CURATE_GPU_DIR": str(carried),
        "CURATE_GPU_CHECK_DIR": str(tmp_path / "work"),
        "HF_HUB_OFFLINE": "1",  # nothing from a hub: the models are built there, the tokenizer is carried
        "PIP_NO_INDEX": "1",
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    verdicts = [line.split()[0] for line in lines if line.startswith(("PASS", "FAIL", "SKIP"))]
    assert "FAIL" not in verdicts and verdicts.count("PASS") >= 10
    assert all("vLLM" in line for line in lines if line.startswith("SKIP"))
    table = (tmp_path / "work" / "gpu_check.dry-run.md").read_text()
    assert "dry run on CPU" in table and "exact: fp32" in table and "throughput, Qwen2.5-1.5B shape" in table
    assert "| Q-Tuning inside the trainer: its cost per training step, SmolLM2-1.7B shape | PASS |" in table
