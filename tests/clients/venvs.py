"""Isolated virtualenvs for the trainers users run (their pins clash with ours), built once under the cache folder.

A venv is used only once its `.q-curate-ready` stamp exists (written last), so an interrupted build is started
again, never used (venvs cannot be renamed: their scripts name their own path). torch is the CPU wheel (2.13.0) on
machines without a GPU; everything else comes from the trainer's own requirements.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

# LLaMA-Factory 0.9.5 imports torchaudio at start-up, although text SFT never uses it, and PyPI has no torchaudio
# for the CPU torch 2.13 (the newest, 2.11, fails to load against it); torchvision is optional for text. A
# stand-in torchaudio keeps the import working and fails loudly if audio is ever used.
TORCHAUDIO_STANDIN = '''"""A stand-in for torchaudio (q-curate tests/clients): no torchaudio build matches this CPU
torch, and LLaMA-Factory imports it at start-up although text SFT never uses it. Any use of audio fails here."""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: this environment has a stand-in torchaudio without audio support")
'''

CLIENTS = {
    "llamafactory": {
        "version": "0.9.5",
        "skip": {"torch", "torchvision", "torchaudio", "av"},
        "extra": ["av<=16.0.0,>=10.0.0"],
        "torchaudio_standin": True,
    },
    "axolotl": {"version": "0.19.0", "skip": {"torch"}, "extra": [], "torchaudio_standin": False},
}


def cache_root() -> Path:
    """The trainers' venvs, in q-curate's cache (CURATE_CACHE, else XDG_CACHE_HOME or ~/.cache, as the tool's)."""
    from curate.storage import cache_dir

    return cache_dir() / "clients"


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def requirements(python: Path, package: str) -> list[str]:
    """The package's own requirements (no extras), as installed metadata lists them."""
    code = (
        f"import importlib.metadata as m, json; print(json.dumps([r for r in m.requires({package!r}) or [] "
        "if 'extra ==' not in r]))"
    )
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def ensure(name: str) -> Path:
    """The venv of trainer `name`, built if missing. Returns its folder (bin/ holds the trainer's command)."""
    spec = CLIENTS[name]
    final = cache_root() / f"{name}-{spec['version']}"
    if (final / ".q-curate-ready").exists():
        return final
    building = final
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    python = building / "bin" / "python"
    _pip(python, "--upgrade", "pip")
    _pip(python, "torch==2.13.0")  # the CPU wheel where it is at hand; a CUDA build elsewhere
    _pip(python, "--no-deps", f"{name}=={spec['version']}")
    wanted = [
        r
        for r in requirements(python, name)
        if r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower() not in spec["skip"]
    ]
    _pip(python, *wanted, *spec["extra"])
    if spec["torchaudio_standin"]:
        site = subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        (Path(site) / "torchaudio").mkdir(exist_ok=True)
        (Path(site) / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STANDIN)
    (building / ".q-curate-ready").write_text(json.dumps({"name": name, "version": spec["version"]}))
    return final
