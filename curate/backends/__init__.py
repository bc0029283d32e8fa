"""Scorer backends behind one small protocol. Heavy imports happen inside the backend modules only.

A scorer takes a list of token-id sequences and returns, per sequence, float32 arrays `logprob` and
`entropy` of the same length (nats; position 0 is NaN because nothing predicts the first token).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..errors import CurateError

BACKENDS = ("auto", "hf")


class Scorer(Protocol):
    name: str
    dtype: str
    entropy_method: str

    def score(self, sequences: Sequence[np.ndarray], on_batch=None) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def close(self) -> None: ...


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why). `auto` picks the transformers backend until the vLLM one exists."""
    if requested not in BACKENDS:
        raise CurateError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "hf", "auto: transformers is the available exact backend"
    return requested, "requested"


def make_scorer(backend: str, model_path: str, *, dtype: str, device: str, batch_tokens: int) -> Scorer:
    if backend == "hf":
        try:
            from .hf import HFScorer
        except ImportError as e:
            raise CurateError(f"backend 'hf' needs torch and transformers: pip install 'q-curate[hf]' ({e})") from None
        return HFScorer(model_path, dtype=dtype, device=device, batch_tokens=batch_tokens)
    raise CurateError(f"unknown backend {backend!r}")
