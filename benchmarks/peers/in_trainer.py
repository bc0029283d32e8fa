"""In-trainer scoring as the Q-Tuning paper's official code does it (a research fork of LLaMA-Factory).

There the scores are computed inside the training step: each micro-batch (8 rows, in dataset order, padded to its
longest row) goes through the model, the full [B, T, V] logits come back, and per-token log-probs and
entropies are computed from them before the sample and token pruning decide the loss. Followed here: micro-batches
of 8 in the given order (no length sorting), right padding to the longest row, the full [B, T, V] logits, then
`log_softmax`, the target log-prob and the entropy per position.

The paper's code scores from the logits of the training forward itself (no extra forward): what it adds to a
training step is this softmax and entropy over the [B, T, V] logits and their memory on the accelerator. Run here as
a pass of its own, it compares the scoring code alone with q-curate's offline scorer; `curate.dynamic` is the
in-trainer form itself.
"""

from __future__ import annotations

import numpy as np
import torch

MICRO_BATCH = 8


@torch.inference_mode()
def score(model, sequences: list[np.ndarray], pad_id: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for start in range(0, len(sequences), MICRO_BATCH):
        batch = sequences[start : start + MICRO_BATCH]
        longest = max(len(s) for s in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
            mask[r, : len(s)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V], all of it
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].cpu()
        ent = (-(logp.exp() * logp).sum(-1)[:, :-1]).cpu()
        for r, s in enumerate(batch):
            n = len(s)
            nan = np.array([np.nan], dtype=np.float32)
            out.append((np.concatenate([nan, lp[r, : n - 1].numpy()]), np.concatenate([nan, ent[r, : n - 1].numpy()])))
    return out
