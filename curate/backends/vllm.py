"""The vLLM scorer: the same numbers as the transformers scorer, at engine speed.

Exact method (default): the model runs as the pooling model of `vllm_glue`, which returns the target log-prob
and the full-vocabulary entropy per position. Fallback (architecture not covered by the glue, or the plugin
entry point missing, or `entropy="topk"`): top-k prompt log-probs. The log-prob of the actual token is still
exact (vLLM always returns it); the entropy is estimated from the top k tokens plus bounds on the tail mass,
and the files say `entropy_method: topk-approx`. A run never mixes the two methods.

Token ids go in as `TokensPrompt`, never as text: vLLM would re-tokenise text and add a second BOS.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Sequence

import numpy as np

from ..config.score import ScoreOptions
from ..errors import CurateError

PROGRESS_TOKENS = 32768  # sequences go to the engine in groups of about this many tokens, for progress
# On CPUs vLLM reads gpu_memory_utilization as a share of RAM left after the weights, which is tiny on small
# machines; a fixed KV-cache size (1 GiB: about 20k tokens of SmolLM2-135M in fp32) is the sane default there.
CPU_KV_CACHE_BYTES = 1 << 30


TOPK = 20  # prompt log-probs per position in the approximate fallback
# Extra vLLM engine arguments, merged last: scripts/gpu_check.sh and the tests set some (e.g. statistics).
ENGINE_OVERRIDES: dict = {}


def plugin_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value.startswith("curate.backends.vllm_glue") for ep in entry_points(group="vllm.general_plugins"))


def model_architecture(model_path: str) -> str | None:
    """The HF architecture of a local folder or hub id (hub ids too: vLLM loads both)."""
    from transformers import AutoConfig

    try:
        archs = AutoConfig.from_pretrained(model_path).architectures or []
    except (OSError, ValueError):
        return None
    return archs[0] if archs else None


def fallback_reason(entropy: str, arch: str | None, plugin_ok: bool) -> str | None:
    """Why the exact method cannot be used (then the top-k approximation is), or None when it can."""
    from .vllm_glue import scorer_architecture

    if entropy == "topk":
        return "requested with --vllm-entropy topk"
    if arch is None or scorer_architecture(arch) is None:
        return f"the exact-entropy plugin does not cover the architecture {arch!r}"
    if not plugin_ok:
        return "the q-curate vLLM plugin entry point is not installed (reinstall q-curate: pip install -e .)"
    return None


def topk_entropy(top_logprobs: np.ndarray, vocab_size: int) -> tuple[float, float, float]:
    """(estimate, lower, upper) entropy in nats from the k largest log-probs of one distribution.

    The tail (mass m outside the top k) holds tokens no likelier than the k-th, p_k, so its entropy lies
    between -m log p_k (mass in as few tokens as possible) and -m log(m / (V - k)) (spread evenly).
    The estimate is the midpoint; the half-width is the largest possible error.
    """
    lp = np.sort(np.asarray(top_logprobs, dtype=np.float64))[::-1]
    p = np.exp(lp)
    head = float(-(p * lp).sum())
    tail = max(0.0, 1.0 - float(p.sum()))
    rest = vocab_size - len(lp)
    if tail <= 0.0 or rest <= 0:
        return head, head, head
    lower = head - tail * float(lp[-1])
    upper = head - tail * math.log(tail / rest)
    upper = max(upper, lower)
    return (lower + upper) / 2, lower, upper


class VLLMScorer:
    name = "vllm"

    def __init__(self, model_path: str, cfg: ScoreOptions, log=lambda msg: None):
        """The engine for `model_path` with the vLLM options of `cfg` (tensor_parallel_size, ..., vllm_entropy)."""
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the progress bar
        import torch
        from vllm import LLM

        from . import resolve_device
        from .vllm_glue import scorer_architecture

        on_gpu = resolve_device(cfg.device).startswith("cuda")
        if not on_gpu and torch.cuda.is_available():
            raise CurateError(
                f"--device {cfg.device} --backend vllm: this vLLM is built for the GPU; score on the CPU with "
                "--backend hf"
            )
        self.dtype = ("bfloat16" if on_gpu else "float32") if cfg.dtype == "auto" else cfg.dtype
        arch = model_architecture(model_path)
        self.why_fallback = fallback_reason(cfg.vllm_entropy, arch, plugin_installed())
        self.timings: dict[str, float] = {}  # the engine does the forward pass and the reduction in one step
        self.exact = self.why_fallback is None
        self.entropy_method = "exact" if self.exact else "topk-approx"
        if not self.exact:
            log(f"warning: vLLM entropies will be approximate (top-{TOPK} with tail bounds): {self.why_fallback}")
        kwargs = dict(
            model=model_path,
            dtype=self.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len or cfg.max_length,
            enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
            enable_prefix_caching=False,
            seed=0,
        )
        if cfg.gpu_memory_utilization or on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization or 0.9
        else:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if self.exact:
            kwargs.update(runner="pooling", hf_overrides={"architectures": [scorer_architecture(arch)]})
        else:
            kwargs.update(max_logprobs=TOPK)
        kwargs.update(ENGINE_OVERRIDES)
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many types at start-up; the message names the cause
            raise CurateError(f"vLLM could not start the engine for {model_path}: {e}") from None
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.entropy_max_error: float | None = None

    def _exact(self, prompts) -> list[tuple[np.ndarray, np.ndarray]]:
        outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [
            (o.outputs.data[:, 0].numpy().astype(np.float32), o.outputs.data[:, 1].numpy().astype(np.float32))
            for o in outs
        ]

    def _topk(self, prompts) -> list[tuple[np.ndarray, np.ndarray]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=TOPK, detokenize=False)
        results = []
        for prompt, out in zip(prompts, self.llm.generate(prompts, params, use_tqdm=False)):
            ids = prompt["prompt_token_ids"]
            lp = np.full(len(ids), np.nan, dtype=np.float32)
            ent = np.full(len(ids), np.nan, dtype=np.float32)
            for i, dist in enumerate(out.prompt_logprobs):
                if dist is None:  # position 0: nothing predicts the first token
                    continue
                lp[i] = dist[ids[i]].logprob
                # The top k by rank; the actual token rides along when it is outside them.
                top = [v.logprob for v in dist.values() if v.rank is not None and v.rank <= TOPK]
                est, lower, upper = topk_entropy(np.array(top), self.vocab_size)
                ent[i] = est
                self.entropy_max_error = max(self.entropy_max_error, (upper - lower) / 2)
            results.append((lp, ent))
        return results

    def score(
        self, sequences: Sequence[np.ndarray], on_batch=None, needed: Sequence[np.ndarray] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Scores in input order; NaN where not `needed` (the engine scores every position regardless)."""
        from vllm.inputs import TokensPrompt

        too_long = [len(s) for s in sequences if len(s) > self.max_model_len]
        if too_long:
            raise CurateError(
                f"a sequence of {max(too_long)} tokens exceeds the engine's max_model_len "
                f"{self.max_model_len}; raise --max-model-len or lower --max-length"
            )
        self.entropy_max_error = None if self.exact else 0.0
        results: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        while start < len(sequences):
            stop, tokens = start, 0
            while stop < len(sequences) and (stop == start or tokens + len(sequences[stop]) <= PROGRESS_TOKENS):
                tokens += len(sequences[stop])
                stop += 1
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences[start:stop]]
            results += self._exact(prompts) if self.exact else self._topk(prompts)
            if on_batch:
                on_batch(stop - start, tokens)
            start = stop
        for (lp, ent), keep in zip(results, needed or []):
            lp[~keep], ent[~keep] = np.nan, np.nan
        return results

    def close(self) -> None:
        """Stop the engine processes and free the memory, so a later engine can start in this process."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            del llm
            gc.collect()
