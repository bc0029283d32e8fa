"""Per-sample scoring as the Cherry-LLM (IFD) and Superfiltering scripts do it.

Those scripts (github.com/tianyi-lab/Cherry_LLM, `cherry_seletion/data_analysis.py`; github.com/tianyi-lab/
Superfiltering, `code_ifd/data_analysis.py`) loop over the dataset one conversation at a time: tokenise, run the
model on that single sequence (batch size 1, no padding), take the full [T, V] logits, and compute the loss or
per-token log-probabilities from them. Followed here: one forward per row, the whole [T, V] logits materialised,
`log_softmax` over them, then the target log-prob and the entropy per position.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def score(model, sequences: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for seq in sequences:
        ids = torch.from_numpy(seq.astype(np.int64))[None].to(model.device)
        logits = model(input_ids=ids).logits[0].float()  # [T, V], all of it
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)[:-1]
        nan = torch.tensor([float("nan")], device=lp.device)
        out.append((torch.cat([nan, lp]).cpu().numpy(), torch.cat([nan, ent]).cpu().numpy()))
    return out
