"""`curate inspect RUN --id ID`: one sample, token by token, in the terminal (a view: it writes nothing)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from rich.table import Table
from rich.text import Text

from . import io, runs
from .errors import CurateError
from .pruning import score_in_words
from .schema import SAMPLES, STATS


def sample_table(run_dir: str | Path, sample_id: str) -> Table:
    found = runs.locate(run_dir)
    info = pl.read_parquet(found.pruned / SAMPLES, glob=False).filter(pl.col("id") == sample_id)
    if info.height == 0:
        raise CurateError(f"{run_dir}: no sample with id {sample_id!r}")
    info = info.row(0, named=True)
    row = runs.rows_by_id(found.score_files(), [sample_id])[sample_id]
    kept = runs.rows_by_id(found.pruned_files(), [sample_id], ["id", "loss_mask"])
    mask = kept[sample_id]["loss_mask"] if kept else None  # None: the sample was dropped
    config = io.read_json(found.pruned / STATS)["config"]
    lam, scale = config["lam"], config.get("token_score", "ppl")
    title = (
        f"{sample_id!r}: {info['quadrant']}, {info['selection'] or 'dropped'}, "  # repr: no raw control characters
        f"ppl {info['ppl']:.3f}, ent {info['ent']:.3f}"
    )
    model = found.scores_manifest["model"]
    caption = Text(f"scored by {model['name']} ({model['path']}); score: the token's {score_in_words(lam, scale)}")
    t = Table(title=Text(title), caption=caption)  # Text, not markup: an id may spell `[/]`
    for col in ("pos", "token", "role", "in loss", "logprob", "entropy", "score"):
        t.add_column(col, justify="right" if col not in ("token", "role") else "left")
    roles = {"prompt": Text("prompt", "dim"), "pruned": Text("pruned", "red")}
    for i, tok in enumerate(runs.token_rows(runs.scoring_tokenizer(found), row, mask, lam, scale)):
        t.add_row(
            str(i),
            repr(tok["t"]),
            roles.get(tok["k"], Text("kept", "green")),  # a dropped sample's response: its trainable tokens
            "1" if tok["k"] == "kept" else "0",
            f"{tok['lp']:.3f}",
            f"{tok['ent']:.3f}",
            f"{tok['s']:.3g}" if tok["s"] is not None else "",
        )
    return t
