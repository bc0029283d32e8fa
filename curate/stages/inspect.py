"""`curate inspect RUN_DIR --id ID`: one sample, token by token, in the terminal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from .. import pruning
from ..errors import CurateError
from .report import load_run, rows_by_id, scoring_tokenizer


def sample_table(run_dir: Path, sample_id: str) -> Table:
    pruned, scores, samples, stats = load_run(run_dir)
    info = samples.filter(samples["id"] == sample_id)
    if info.height == 0:
        raise CurateError(f"{run_dir}: no sample with id {sample_id!r}")
    info = info.row(0, named=True)
    row = rows_by_id(sorted(scores.glob("part-*.parquet")), [sample_id])[sample_id]
    kept = rows_by_id(sorted((pruned / "data").glob("*.parquet")), [sample_id], ["id", "loss_mask"])
    mask = kept[sample_id]["loss_mask"] if kept else None  # None: the sample was dropped
    tok = scoring_tokenizer(scores)
    trainable = np.asarray(row["trainable"], dtype=np.int8)
    s = pruning.context_scores(np.nan_to_num(np.asarray(row["logprob"], dtype=np.float32)), trainable,
                               stats["config"]["lam"])
    title = (f"{sample_id}: {info['quadrant']}, {info['selection'] or 'dropped'}, "
             f"ppl {info['ppl']:.3f}, ent {info['ent']:.3f}")
    t = Table(title=title)
    for col in ("pos", "token", "role", "in loss", "logprob", "entropy", "score"):
        t.add_column(col, justify="right" if col not in ("token", "role") else "left")
    for i, tid in enumerate(row["input_ids"]):
        keep = mask[i] if mask is not None else trainable[i]
        role = "[dim]prompt[/]" if not trainable[i] else ("[green]kept[/]" if keep else "[red]pruned[/]")
        t.add_row(str(i), repr(tok.decode([tid])), role, "1" if (mask is not None and keep and trainable[i]) else "0",
                  f"{row['logprob'][i]:.3f}", f"{row['entropy'][i]:.3f}", f"{s[i]:.3g}" if trainable[i] else "")
    return t
