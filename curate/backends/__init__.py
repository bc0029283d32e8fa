"""Scorer backends behind one small protocol. Heavy imports happen inside the backend modules only.

A scorer takes a list of token-id sequences and returns, per sequence, float32 arrays `logprob` and
`entropy` of the same length (nats; position 0 is NaN because nothing predicts the first token).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..errors import CurateError

BACKENDS = ("auto", "hf", "vllm")


class Scorer(Protocol):
    name: str
    dtype: str
    entropy_method: str
    entropy_max_error: float | None  # largest possible entropy error (nats) of the last score() call; None: exact

    def score(self, sequences: Sequence[np.ndarray], on_batch=None) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def close(self) -> None: ...


def choose_backend(requested: str, device: str = "auto") -> tuple[str, str]:
    """(backend, why). `auto` picks vLLM only with a CUDA GPU: on CPUs transformers is faster (DESIGN.md 5)."""
    import importlib.util

    if requested not in BACKENDS:
        raise CurateError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "requested"
    if device == "cpu":
        return "hf", "auto: --device cpu, where transformers is faster than vLLM"
    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vllm is not installed"
    import torch

    if not torch.cuda.is_available():
        return "hf", "auto: no CUDA GPU (on CPUs transformers is faster than vLLM)"
    return "vllm", f"auto: CUDA GPU ({torch.cuda.get_device_name(0)}) and vLLM available"


def make_scorer(backend: str, model_path: str, *, dtype: str, device: str, batch_tokens: int, max_length: int = 2048,
                engine=None, log=lambda msg: None) -> Scorer:
    if backend == "hf":
        try:
            from .hf import HFScorer
        except ImportError as e:
            raise CurateError(f"backend 'hf' needs torch and transformers: pip install 'q-curate[hf]' ({e})") from None
        return HFScorer(model_path, dtype=dtype, device=device, batch_tokens=batch_tokens)
    if backend == "vllm":
        from .vllm import VLLMScorer

        return VLLMScorer(model_path, dtype=dtype, max_length=max_length, options=engine, log=log)
    raise CurateError(f"unknown backend {backend!r}")
