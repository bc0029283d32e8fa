"""The built-in model: converted once, even when two processes ask for it at the same moment."""

import os
import subprocess
import sys

import pytest

FIRST_USE = "from curate.models import ensure_builtin; print(ensure_builtin())"


@pytest.mark.slow  # converts the built-in GGUF (about 20 s)
def test_two_processes_on_first_use_convert_once_and_both_get_the_folder(tmp_path):
    env = {**os.environ, "CURATE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outs]
    folders = {out.decode().strip() for out, _ in outs}
    assert len(folders) == 1
    folder = tmp_path / "cache" / "models" / os.path.basename(folders.pop())
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert sum(b"First use of the built-in model" in err for _, err in outs) == 1  # the other waited, then found it
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]
