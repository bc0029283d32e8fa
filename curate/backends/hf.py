"""The transformers scorer: exact per-token log-probs and full-vocabulary entropies.

The decoder runs once per batch; the vocabulary-sized logits are never materialised for a whole batch.
Instead the hidden states of all scored positions are projected through the LM head a chunk of positions
at a time, so memory stays bounded for 2048-token rows and 150k vocabularies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import CurateError
from . import resolve_device

# Bytes allowed for the logits of one chunk of positions at the reduction's peak (the logits and one buffer of the
# same size). On CPUs 64 MiB is as fast as 512 MiB and keeps the peak a third as high (BENCHMARKS.md); GPUs get larger
# chunks for their matmuls. CURATE_LOGITS_BYTES overrides both (a tight GPU; the tests use it to force chunks).
LOGITS_CHUNK_BYTES = {"cpu": 64 * 1024 * 1024, "cuda": 512 * 1024 * 1024}


# Default padded tokens per batch. On CPU 2,048 measured about 10% faster than 4,096, and smaller on 2,048-token
# rows (about 700 against 950 MiB above the weights): the larger batch's activations cost more than it gains.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 4096


def chunk_positions(vocab_size: int, device: str) -> int:
    """Positions whose fp32 logits and reduction buffer fit the byte budget of `device` (at least 1)."""
    default = LOGITS_CHUNK_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    budget = int(os.environ.get("CURATE_LOGITS_BYTES", default))
    return max(1, budget // (vocab_size * 4 * 2))


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`dtype` is one of the config's canonical names: auto, float32, bfloat16, float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `logits` [n, V]: log p(target) and the entropy -sum p log p, both in nats, float32 (NaN
    entropies with `entropy=False`: the answer-alone pass of `--signals ifd` needs log-probs only).

    In place, to keep the peak at two [n, V] buffers: fp32 `logits` are overwritten with log p (callers hand
    over a chunk they own). log p = z - logsumexp(z); H = -sum exp(log p) log p.
    """
    logp = logits.float()
    lse = torch.logsumexp(logp, dim=-1, keepdim=True)
    target_lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    if not entropy:
        return target_lp, torch.full_like(target_lp, float("nan"))
    logp.sub_(lse)
    entropy = -torch.exp(logp).mul_(logp).sum(-1)
    return target_lp, entropy


def chunked_logprob_entropy(
    hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int, transform=None, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprob_entropy(head(hidden), targets)` computed `chunk` positions at a time."""
    lps, ents = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk])
        if transform is not None:
            logits = transform(logits)
        lp, ent = logprob_entropy(logits, targets[start : start + chunk], entropy)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def token_budget_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest row) fits `batch_tokens`.

    Longest first, so each batch holds rows of similar length and padding stays small. A row longer than
    the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFScorer:
    name = "hf"
    entropy_method = "exact"
    entropy_max_error = None

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "auto", batch_tokens: int | None = None):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is the one the user watches

        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        except Exception as e:  # missing files, a refused pickle checkpoint, a broken config: one line, not a traceback
            detail = " ".join(str(e).split())[:400]
            raise CurateError(f"cannot load the model {model_path!r}: {type(e).__name__}: {detail}") from None
        self.model.to(self.device).eval()
        self.batch_tokens = batch_tokens or (CPU_BATCH_TOKENS if self.device == "cpu" else GPU_BATCH_TOKENS)
        self.head = self.model.get_output_embeddings()
        self.vocab_size = vocab = self.head.weight.shape[0]
        self.chunk = chunk_positions(vocab, self.device)
        self.timings = {"forward": 0.0, "reduction": 0.0}  # seconds, for `make bench`
        cfg = self.model.config
        softcap = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        # A few architectures post-process logits inside forward(); replicate that here.
        self.transform = None
        if softcap:
            self.transform = lambda z: torch.tanh(z / softcap) * softcap
        elif isinstance(scale, (int, float)) and scale != 1:
            self.transform = lambda z: z * scale

    @torch.inference_mode()
    def _score_batch(
        self, seqs: list[np.ndarray], needed: list[np.ndarray] | None, entropy: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        t0 = time.perf_counter()
        longest = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[row, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.device.startswith("cuda"):  # kernels run asynchronously: time the forward to its end
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        # Position t predicts token t+1. Score the targets that are needed (all but the first, by default): the LM
        # head and the reduction then skip the rest (with trainable-only scores, the whole prompt).
        targets = [
            np.flatnonzero(n[1:]) + 1 if n is not None else np.arange(1, len(s))
            for s, n in zip(seqs, needed or [None] * len(seqs))
        ]
        rows = torch.cat([torch.full((len(t),), r, dtype=torch.long) for r, t in enumerate(targets)]).to(self.device)
        cols = torch.from_numpy(np.concatenate(targets)).to(self.device)
        lp, ent = chunked_logprob_entropy(
            hidden[rows, cols - 1], self.head, ids[rows, cols], self.chunk, self.transform, entropy
        )
        lp, ent = lp.cpu().numpy(), ent.cpu().numpy()
        out, offset = [], 0
        for s, t in zip(seqs, targets):
            row_lp = np.full(len(s), np.nan, dtype=np.float32)
            row_ent = np.full(len(s), np.nan, dtype=np.float32)
            row_lp[t], row_ent[t] = lp[offset : offset + len(t)], ent[offset : offset + len(t)]
            out.append((row_lp, row_ent))
            offset += len(t)
        self.timings["forward"] += t1 - t0
        self.timings["reduction"] += time.perf_counter() - t1
        return out

    def score(
        self,
        sequences: Sequence[np.ndarray],
        on_batch=None,
        needed: Sequence[np.ndarray] | None = None,
        entropy: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Scores in input order (NaN where not `needed`, a boolean mask per sequence; default: every position
        but the first; NaN entropies with `entropy=False`). `on_batch(rows, tokens)` is called after each batch."""
        results: list = [None] * len(sequences)
        for batch in token_budget_batches([len(s) for s in sequences], self.batch_tokens):
            part = [needed[i] for i in batch] if needed is not None else None
            for i, r in zip(batch, self._score_batch([sequences[i] for i in batch], part, entropy)):
                results[i] = r
            if on_batch is not None:
                on_batch(len(batch), sum(len(sequences[i]) for i in batch))
        return results

    def close(self) -> None:
        self.model = None
