"""The version-specific vLLM glue (written against vllm 0.32): a pooling model that returns, for every position,
the log-prob of the actual token and the exact full-vocabulary entropy of the distribution that predicted it.

vLLM's generate path only offers top-k prompt log-probs (full-vocabulary ones are ~100x slower and run out of
memory), so the scorer runs the causal LM as a *pooling* model instead: the backbone computes hidden states as
usual, and our token-wise pooler projects them through the model's own LM head in chunks and reduces each
chunk's logits to (log-prob, entropy) on the device. Only two floats per token leave the engine.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml), so the classes exist in every vLLM
process, including the engine core that vLLM spawns. The scorer selects them with
`hf_overrides={"architectures": [scorer_architecture(arch)]}`, leaving the model folder untouched.
"""

from __future__ import annotations

import importlib

# Decoder-only architectures whose vLLM class exposes `lm_head` and `logits_processor` (checked in 0.32).
BASES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "MistralForCausalLM": "vllm.model_executor.models.mistral",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
}
PREFIX = "QCurateScorer"


def scorer_architecture(arch: str) -> str | None:
    """The registered pooling architecture for a model's HF architecture, or None when unsupported."""
    return PREFIX + arch if arch in BASES else None


def register() -> None:
    from vllm import ModelRegistry

    for arch in BASES:
        # Lazy "module:Class" strings: nothing heavy is imported until the engine builds the model.
        ModelRegistry.register_model(PREFIX + arch, f"{__name__}:{PREFIX + arch}")


def __getattr__(name: str):
    """Module attributes QCurateScorer<Arch> are built on first access (vLLM imports them by name)."""
    arch = name[len(PREFIX) :] if name.startswith(PREFIX) else None
    if arch not in BASES:
        raise AttributeError(name)
    cls = _scorer_class(arch)
    globals()[name] = cls
    return cls


def _score_positions(logits_fn, hidden, token_ids, chunk: int, request: str = ""):
    """(n, 2) float32: [:, 0] = log p(token_i | <i), [:, 1] = entropy of that distribution; NaN at position 0.

    `hidden` must hold one row per prompt token: a request whose chunked prefill (or a preemption and
    recomputation) left it with another count would silently shift every score, so that is an error."""
    import torch

    from .hf import logprob_entropy  # the same reduction as the transformers scorer

    n = hidden.shape[0]
    if n != len(token_ids):
        raise RuntimeError(
            f"q-curate scorer: request {request} has {n} pooled hidden states for {len(token_ids)} "
            "prompt tokens; its scores would be misaligned"
        )
    out = torch.full((n, 2), float("nan"), dtype=torch.float32, device=hidden.device)
    targets = token_ids.to(hidden.device, dtype=torch.long)
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)  # hidden state i predicts token i + 1
        logits = logits_fn(hidden[start:stop])
        if logits is None:
            # In gather mode every tensor-parallel rank receives the logits; a rank without them would skip the
            # collectives of the next chunks and leave the others waiting forever: stop instead.
            raise RuntimeError(
                "q-curate scorer: this tensor-parallel rank received no gathered logits; vLLM must "
                "all-gather the logits on every rank (logits_processor use_all_gather)"
            )
        lp, ent = logprob_entropy(logits, targets[start + 1 : stop + 1])
        out[start + 1 : stop + 1, 0], out[start + 1 : stop + 1, 1] = lp, ent
    return out


def _scorer_class(arch: str):
    from vllm.model_executor.layers.pooler import PoolingParamsUpdate
    from vllm.model_executor.layers.pooler.abstract import Pooler
    from vllm.model_executor.layers.pooler.tokwise.methods import AllPool
    from vllm.model_executor.models.interfaces_base import VllmModelForPooling

    from . import resolve_device
    from .hf import chunk_positions

    base = getattr(importlib.import_module(BASES[arch]), arch)

    class LogprobEntropyPooler(Pooler):
        def __init__(self, logits_fn, vocab_size: int):
            super().__init__()
            # positions per chunk, from the logits byte budget of the device this vLLM worker runs on
            self.chunk = chunk_positions(vocab_size, resolve_device("auto"))
            self.pooling = AllPool()  # collects the hidden states of chunked prefills until a prompt is complete
            self.logits_fn = logits_fn  # a plain function, so the model is not registered as a submodule twice

        def get_supported_tasks(self):
            return {"token_embed"}

        def get_pooling_updates(self, task):
            return PoolingParamsUpdate(requires_token_ids=True)

        def forward(self, hidden_states, pooling_metadata):
            pooled = self.pooling(hidden_states, pooling_metadata)
            token_ids = pooling_metadata.get_prompt_token_ids_cpu()
            lens = pooling_metadata.prompt_lens.tolist()
            return [
                None
                if h is None  # a chunked prefill in progress: its hidden states are still being collected
                else _score_positions(self.logits_fn, h, ids, self.chunk, f"#{i} of this step ({lens[i]} tokens)")
                for i, (h, ids) in enumerate(zip(pooled, token_ids))
            ]

    class Scorer(base, VllmModelForPooling):
        is_pooling_model = True

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            vocab = vllm_config.model_config.get_vocab_size()
            self.pooler = LogprobEntropyPooler(lambda h: self.logits_processor(self.lm_head, h), vocab)

    Scorer.__name__ = Scorer.__qualname__ = PREFIX + arch
    return Scorer
