"""Scorer backends behind one small protocol. Heavy imports happen inside the backend modules only.

A scorer takes a list of token-id sequences and returns, per sequence, float32 arrays `logprob` and
`entropy` of the same length (nats; position 0 is NaN because nothing predicts the first token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config import ScoreOptions
from ..extras import installed, require


class Scorer(Protocol):
    name: str
    dtype: str
    vocab_size: int  # entropies lie in [0, log vocab_size]
    entropy_method: str
    entropy_max_error: float | None  # largest possible entropy error (nats) of the last score() call; None: exact

    def score(self, sequences: Sequence[np.ndarray], on_batch=None) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def close(self) -> None: ...


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
