"""Pass 1 of `curate prune`, as a library: every sample placed on the EU plane from its scores, identical
conversations marked, and the triage to an exact budget per partition (group, batch) by a registered strategy.
Pure: Parquet scores or a polars frame in, a polars frame out; the prune stage and the probe both select through it,
and the in-trainer loss (`curate.dynamic`) uses the same strategies and `pruning` functions per micro-batch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from . import pruning, schema, strategies
from .config.prune import PruneOptions
from .errors import CurateError


def score_files(scores_dir: Path, manifest: dict) -> list[Path]:
    return [scores_dir / f["name"] for f in manifest["files"]]


def collect_coordinates(
    shards: list[Path], cfg: PruneOptions, vocab_size: int | None, positions: str = "all", signals: list[str] = ()
) -> pl.DataFrame:
    """id, ppl, ent, n_trainable, shard (and group) of every sample, and with `signals` ifd their ppl_alone and
    ifd; every score checked on the way."""
    frames = []
    extra = [cfg.group_by] if cfg.group_by else []
    alone = [name for name, _ in schema.ALONE] if "ifd" in signals else []
    extra += alone
    for i, path in enumerate(shards):
        try:
            df = pl.read_parquet(  # glob=False: a folder named `s[1]` is a path, not a pattern
                path, columns=["id", "content_hash", "n_tokens", "trainable", "logprob", "entropy", *extra], glob=False
            )
        except Exception as e:  # polars raises many types for a damaged file; name it
            raise CurateError(f"{path}: cannot read the scores ({e})") from None
        coords = pruning.sample_coordinates(df, cfg.entropy_positions, vocab_size, positions)
        bad = coords.filter(pl.col("problem").is_not_null())
        if bad.height:
            row = bad.row(0, named=True)
            raise CurateError(
                f"{path}: sample {row['id']!r} {row['problem']} ({bad.height} such samples in this "
                "shard); the scores are damaged: rescore with `curate score --force`"
            )
        coords = coords.drop("problem").with_columns(shard=pl.lit(i, pl.Int32), content_hash=df["content_hash"])
        if cfg.group_by:
            coords = coords.with_columns(group=df[cfg.group_by].fill_null("(none)"))
        if alone:  # IFD from the conversation's perplexity, before any placement moves it
            ppl_alone = (df["alone_nll"] / df["alone_tokens"].cast(pl.Float64)).exp()
            coords = coords.with_columns(ppl_alone=ppl_alone).with_columns(ifd=pl.col("ppl") / pl.col("ppl_alone"))
        frames.append(coords)
    coords = pl.concat(frames)
    dup = coords.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise CurateError(f"scores contain the id {dup['id'][0]!r} more than once; ids must be unique")
    return coords


def mark_duplicates(coords: pl.DataFrame, keep_duplicates: bool) -> pl.DataFrame:
    """`duplicate_of`: for a later copy of an identical conversation, the id of the first copy (smallest id);
    null for first copies, and for every sample with --keep-duplicates. Copies would share the budget."""
    first = coords.group_by("content_hash").agg(duplicate_of=pl.col("id").min())
    coords = coords.join(first, on="content_hash", how="left", maintain_order="left")
    copy = (pl.col("duplicate_of") != pl.col("id")) & pl.lit(not keep_duplicates)
    return coords.with_columns(duplicate_of=pl.when(copy).then(pl.col("duplicate_of")))


def partitions(coords: pl.DataFrame, cfg: PruneOptions) -> np.ndarray:
    """The triage unit of every sample: its group (with --group-by), then its batch (with --scope batch)."""
    n = coords.height
    groups = coords["group"].to_numpy() if "group" in coords.columns else np.zeros(n, dtype=object)
    if cfg.scope == "global":
        return pruning.codes(groups)
    part = np.empty(n, dtype=np.int64)
    offset = 0
    for g in pruning.unique_in_order(groups):
        idx = np.flatnonzero(groups == g)
        # batches are shuffled within each group, so a group's share holds batch by batch too
        part[idx] = offset + pruning.batch_assignment(len(idx), cfg.batch_size, cfg.seed)
        offset = part[idx].max() + 1
    return part


def partition_budgets(part: np.ndarray, groups: np.ndarray | None, cfg: PruneOptions) -> np.ndarray:
    """K per partition: each group keeps exactly budget(its ratio, its size), split over its batches."""
    sizes = np.bincount(part)
    budgets = np.zeros(len(sizes), dtype=np.int64)
    for g in pruning.unique_in_order(groups) if groups is not None else [None]:
        members = part if g is None else part[groups == g]
        ratio = cfg.ratio if g is None else cfg.group_ratios.get(g, cfg.ratio)
        parts = np.unique(members)
        budgets[parts] = pruning.split_budget(pruning.budget(ratio, len(members)), sizes[parts])
    return budgets


def select(coords: pl.DataFrame, cfg: PruneOptions) -> tuple[pl.DataFrame, dict]:
    """Adds quadrant, batch and selection columns; returns them with the triage summary."""
    ids = coords["id"].to_numpy().astype(str)
    ppl, ent = coords["ppl"].to_numpy(), coords["ent"].to_numpy()
    groups = coords["group"].to_numpy() if "group" in coords.columns else None
    median = pruning.medians(ppl, ent)
    quadrant = pruning.quadrant_labels(ppl, ent, median)
    selection = np.full(len(ids), None, dtype=object)
    part = partitions(coords, cfg)
    budgets = partition_budgets(part, groups, cfg)
    alphas, thresholds, notes = [], None, Counter()
    strategy = strategies.get(cfg.strategy)
    columns = {"id": ids, **{c: coords[c].to_numpy() for c in (*strategies.BASE_COLUMNS[1:], *strategy.needs)}}
    # One stable sort groups every partition's indices (ascending) without an O(N) scan per partition.
    order = np.argsort(part, kind="stable")
    starts = np.flatnonzero(np.diff(part[order], prepend=-1))
    for idx in np.split(order, starts[1:]):
        k = int(budgets[part[idx[0]]])
        if k == 0:  # a batch whose share of the budget rounds to nothing
            continue
        seed = cfg.seed + int(part[idx[0]])
        result = strategy.select({c: v[idx] for c, v in columns.items()}, k, seed, cfg.fill)
        selection[idx] = result.selection
        if result.alpha is not None:
            alphas.append(result.alpha)
        thresholds = result.thresholds
        notes.update(result.notes)
    one_triage = cfg.scope == "global" and groups is None
    out = coords.with_columns(
        pl.Series("quadrant", quadrant),
        pl.Series("batch", part),
        pl.Series("selection", list(selection), dtype=pl.String),
    )
    summary = {
        "alpha": thresholds["alpha"] if one_triage and thresholds else None,
        "thresholds": thresholds if one_triage else None,
        "alpha_per_batch": (
            {"min": min(alphas), "mean": float(np.mean(alphas)), "max": max(alphas)}
            if alphas and not one_triage
            else None
        ),
        "medians": median,
        **({"strategy_notes": dict(notes)} if notes else {}),
    }
    return out, summary
