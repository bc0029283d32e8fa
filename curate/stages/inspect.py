"""`curate inspect RUN --id ID`: one sample, token by token, in the terminal (a view: it writes nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from rich.table import Table
from rich.text import Text

from .. import io, pruning, runs
from ..errors import CurateError
from ..schema import SAMPLES, STATS


def sample_table(run_dir: Path, sample_id: str) -> Table:
    found = runs.locate(run_dir)
    info = pl.read_parquet(found.pruned / SAMPLES, glob=False).filter(pl.col("id") == sample_id)
    if info.height == 0:
        raise CurateError(f"{run_dir}: no sample with id {sample_id!r}")
    info = info.row(0, named=True)
    row = runs.rows_by_id(found.score_files(), [sample_id])[sample_id]
    kept = runs.rows_by_id(found.pruned_files(), [sample_id], ["id", "loss_mask"])
    mask = kept[sample_id]["loss_mask"] if kept else None  # None: the sample was dropped
    tok = runs.scoring_tokenizer(found)
    trainable = np.asarray(row["trainable"], dtype=np.int8)
    lam = io.read_json(found.pruned / STATS)["config"]["lam"]
    s = pruning.context_scores(np.nan_to_num(np.asarray(row["logprob"], dtype=np.float32)), trainable, lam)
    title = (
        f"{sample_id!r}: {info['quadrant']}, {info['selection'] or 'dropped'}, "  # repr: no raw control characters
        f"ppl {info['ppl']:.3f}, ent {info['ent']:.3f}"
    )
    t = Table(title=Text(title))  # Text, not markup: an id may spell `[/]`
    for col in ("pos", "token", "role", "in loss", "logprob", "entropy", "score"):
        t.add_column(col, justify="right" if col not in ("token", "role") else "left")
    for i, tid in enumerate(row["input_ids"]):
        keep = mask[i] if mask is not None else trainable[i]
        role = Text("prompt", "dim") if not trainable[i] else (Text("kept", "green") if keep else Text("pruned", "red"))
        t.add_row(
            str(i),
            repr(tok.decode([tid])),
            role,
            "1" if (mask is not None and keep and trainable[i]) else "0",
            f"{row['logprob'][i]:.3f}",
            f"{row['entropy'][i]:.3f}",
            f"{s[i]:.3g}" if trainable[i] else "",
        )
    return t
