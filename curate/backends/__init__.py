"""Scorer backends behind one small protocol. Heavy imports happen inside the backend modules only.

A scorer takes a list of token-id sequences and returns, per sequence, float32 arrays `logprob` and
`entropy` of the same length (nats; position 0 is NaN because nothing predicts the first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config.score import ScoreOptions
from ..extras import installed, require


class Scorer(Protocol):
    name: str
    dtype: str
    vocab_size: int  # entropies lie in [0, log vocab_size]
    entropy_method: str
    entropy_max_error: float | None  # largest possible entropy error (nats) of the last score() call; None: exact
    timings: dict[str, float]  # seconds spent by phase (forward, reduction, ...), for the manifest and `make bench`

    def score(
        self,
        sequences: Sequence[np.ndarray],
        on_batch=None,
        needed: Sequence[np.ndarray] | None = None,  # per sequence, the positions whose scores are wanted
    ) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def close(self) -> None: ...


def resolve_device(device: str) -> str:
    """`auto` -> cuda or cpu; cuda without a GPU is an error. The one place a device is decided."""
    import torch

    from ..errors import CurateError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"--device {device}: CUDA is not available on this machine")
    return device


def choose_backend(requested: str, device: str = "auto") -> tuple[str, str]:
    """(backend, why). `auto` picks vLLM only with a CUDA GPU: on CPUs transformers is faster (BENCHMARKS.md)."""
    if requested != "auto":
        return requested, "requested"
    if device == "cpu":
        return "hf", "auto: --device cpu, where transformers is faster than vLLM"
    if not installed("vllm"):
        return "hf", "auto: vllm is not installed"
    if not installed("torch"):
        return "hf", "auto: torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "hf", "auto: no CUDA GPU (on CPUs transformers is faster than vLLM)"
    return "vllm", f"auto: CUDA GPU ({torch.cuda.get_device_name(0)}) and vLLM available"


BF16_FEATURES = ("amx_bf16", "avx512_bf16")  # CPU instructions that compute bf16 matmuls natively


def cpu_bf16_feature(capabilities: dict | None = None) -> str | None:
    """The feature by which this CPU computes bf16 natively, as torch reports the CPU (`torch.cpu.get_capabilities`,
    else the kernel's /proc/cpuinfo flags), or None: without one, torch emulates bf16 and it runs slower than fp32."""
    if capabilities is None:
        capabilities = _cpu_capabilities()
    return next((f for f in BF16_FEATURES if capabilities.get(f)), None)


def _cpu_capabilities() -> dict:
    import torch

    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return {}
    return {flag: True for flag in flags}


def choose_dtype(requested: str, device: str, bf16_feature: str | None = None) -> tuple[str, str]:
    """(dtype, why) for a scoring run: bfloat16 on CUDA and on a CPU with native bf16 (`bf16_feature`), else
    float32. `device` is resolved (cpu, cuda, cuda:N)."""
    if requested != "auto":
        return requested, "requested"
    if device.startswith("cuda"):
        return "bfloat16", "auto: CUDA GPU"
    if bf16_feature:
        return "bfloat16", f"auto: native bf16 on this CPU ({bf16_feature})"
    return "float32", "auto: this CPU has no native bf16 (no amx_bf16 or avx512_bf16), where float32 is faster"


def require_backend(backend: str) -> None:
    require("torch", "transformers", purpose="scoring")
    if backend == "vllm":
        require("vllm", purpose="--backend vllm")


def make_scorer(backend: str, model_path: str, cfg: ScoreOptions, log=lambda msg: None) -> Scorer:
    """The scorer for `backend` ("hf" or "vllm") with the options of `cfg`."""
    require_backend(backend)
    if backend == "vllm":
        from .vllm import VLLMScorer

        return VLLMScorer(model_path, cfg, log=log)
    from .hf import HFScorer

    return HFScorer(model_path, dtype=cfg.dtype, device=cfg.device, batch_tokens=cfg.batch_tokens)
