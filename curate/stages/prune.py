"""`curate prune`: place samples on the EU plane, keep an exact budget, mask noisy tokens.

Two passes so memory does not grow with the dataset: pass 1 reads only per-sample statistics from every
scores shard; pass 2 rewrites one shard at a time with the loss masks of the kept samples.
Output: `OUT/data/train-NNNNN-of-MMMMM.parquet` (schema.PRUNED), `OUT/samples.parquet` (every input sample,
its coordinates, quadrant and fate), `OUT/stats.json`, and `OUT/_manifest.json` last.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io, pruning, schema
from ..errors import CurateError


@dataclass
class PruneConfig:
    scores: str
    out: str
    ratio: float = 0.125
    token_ratio: float = 0.5
    lam: float = 0.5
    scope: str = "global"
    batch_size: int = 8
    seed: int = 0
    entropy_positions: str = "response"
    token_order: str = "drop-high"
    strategy: str = "qtuning"
    token_strategy: str = "qtuning"


def validate(cfg: PruneConfig) -> None:
    """Every problem at once, each naming its option."""
    problems = []
    if not 0 < cfg.ratio <= 1:
        problems.append(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if not 0 < cfg.token_ratio <= 1:
        problems.append(f"--token-ratio must be in (0, 1], got {cfg.token_ratio}")
    if not 0 <= cfg.lam <= 1:
        problems.append(f"--lam must be in [0, 1], got {cfg.lam}")
    if cfg.scope not in ("global", "batch"):
        problems.append(f"--scope must be global or batch, got {cfg.scope!r}")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.entropy_positions not in ("response", "all"):
        problems.append(f"--entropy-positions must be response or all, got {cfg.entropy_positions!r}")
    if cfg.token_order not in ("drop-high", "drop-low"):
        problems.append(f"--token-order must be drop-high or drop-low, got {cfg.token_order!r}")
    if cfg.strategy not in pruning.SAMPLE_STRATEGIES:
        problems.append(f"--strategy must be one of {', '.join(pruning.SAMPLE_STRATEGIES)}, got {cfg.strategy!r}")
    if cfg.token_strategy not in pruning.TOKEN_STRATEGIES:
        problems.append(f"--token-strategy must be one of {', '.join(pruning.TOKEN_STRATEGIES)}, got {cfg.token_strategy!r}")
    if problems:
        raise CurateError("; ".join(problems))


def score_shards(scores_dir: Path) -> list[Path]:
    if not scores_dir.is_dir():
        raise CurateError(f"{scores_dir}: no such scores folder (run `curate score` first)")
    shards = sorted(scores_dir.glob(schema.SCORES_GLOB))
    if not shards:
        raise CurateError(f"{scores_dir}: no part-*.parquet score shards")
    if not (scores_dir / io.MANIFEST).exists():
        raise CurateError(f"{scores_dir}: the scoring run is unfinished (no _manifest.json); rerun `curate score` to complete it")
    return shards


# ---------------------------------------------------------------- pass 1: the plane and the triage


def collect_coordinates(shards: list[Path], entropy_positions: str) -> pl.DataFrame:
    frames = []
    for i, path in enumerate(shards):
        df = pl.read_parquet(path, columns=["id", "trainable", "logprob", "entropy"])
        coords = pruning.sample_coordinates(df, entropy_positions)
        frames.append(coords.with_columns(shard=pl.lit(i, pl.Int32)))
    coords = pl.concat(frames)
    bad = coords.filter((pl.col("nan_positions") > 0) | pl.col("ppl").is_nan() | pl.col("ent").is_nan()
                        | pl.col("ppl").is_null() | pl.col("ent").is_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise CurateError(f"{shards[row['shard']]}: sample {row['id']!r} has NaN scores on trainable tokens "
                          f"({bad.height} such samples); rescore with `curate score --force`")
    dup = coords.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise CurateError(f"scores contain the id {dup['id'][0]!r} more than once; ids must be unique")
    return coords


def select(coords: pl.DataFrame, cfg: PruneConfig) -> tuple[pl.DataFrame, dict]:
    """Adds quadrant, batch and selection columns; returns them with the triage summary."""
    ids = coords["id"].to_numpy().astype(str)
    ppl, ent = coords["ppl"].to_numpy(), coords["ent"].to_numpy()
    n = len(ids)
    median = pruning.medians(ppl, ent)
    quadrant = pruning.quadrant_labels(ppl, ent, median)
    selection = np.full(n, None, dtype=object)
    if cfg.scope == "global":
        batch = np.zeros(n, dtype=np.int64)
    else:
        batch = pruning.batch_assignment(n, cfg.batch_size, cfg.seed)
    alphas, thresholds = [], None
    # One stable sort groups every batch's indices (ascending) without an O(N) scan per batch.
    order = np.argsort(batch, kind="stable")
    starts = np.flatnonzero(np.diff(batch[order], prepend=-1))
    for idx in np.split(order, starts[1:]):
        b = batch[idx[0]]
        k = pruning.budget(cfg.ratio, len(idx))
        result = pruning.triage(cfg.strategy, ids[idx], ppl[idx], ent[idx], k, cfg.seed + int(b))
        selection[idx] = result.selection
        if result.alpha is not None:
            alphas.append(result.alpha)
        thresholds = result.thresholds if cfg.scope == "global" else None
    out = coords.with_columns(pl.Series("quadrant", quadrant), pl.Series("batch", batch),
                              pl.Series("selection", list(selection), dtype=pl.String))
    summary = {
        "alpha": thresholds["alpha"] if thresholds else None,
        "thresholds": thresholds,
        "alpha_per_batch": ({"min": min(alphas), "mean": float(np.mean(alphas)), "max": max(alphas)}
                            if alphas and cfg.scope == "batch" else None),
        "medians": median,
    }
    return out, summary


# ---------------------------------------------------------------- pass 2: the masks


def prune_rows(rows: pa.Table, fate: dict[str, tuple], cfg: PruneConfig) -> tuple[pa.Table, int]:
    """Pruned-schema table for the kept rows of one scores shard, and its loss-token count."""
    cols = {name: [] for name in schema.PRUNED.names}
    loss_tokens = 0
    data = rows.to_pydict()
    for i, sid in enumerate(data["id"]):
        if sid not in fate:
            continue
        quadrant, selection, ppl, ent = fate[sid]
        ids = np.asarray(data["input_ids"][i], dtype=np.int32)
        trainable = np.asarray(data["trainable"][i], dtype=np.int8)
        prune_tokens = selection in ("Q2", "fill-Q2") or selection in pruning.SAMPLE_STRATEGIES
        if prune_tokens:
            mask = pruning.token_keep_mask(
                np.asarray(data["logprob"][i], dtype=np.float32), trainable, truncated=data["truncated"][i],
                token_ratio=cfg.token_ratio, lam=cfg.lam, order=cfg.token_order, strategy=cfg.token_strategy,
                seed=pruning.sample_seed(cfg.seed, sid))
        else:
            mask = trainable.copy()
        labels = np.where(mask == 1, ids, schema.IGNORE_INDEX).astype(np.int32)
        loss_tokens += int(mask.sum())
        for name, value in (("id", sid), ("messages", data["messages"][i]), ("input_ids", ids),
                            ("attention_mask", np.ones(len(ids), dtype=np.int8)), ("labels", labels),
                            ("loss_mask", mask), ("assistant_masks", mask), ("quadrant", quadrant),
                            ("selection", selection), ("ppl", ppl), ("ent", ent)):
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=schema.PRUNED), loss_tokens


def run(cfg: PruneConfig, log=lambda msg: None, force: bool = False) -> dict:
    validate(cfg)
    started = time.time()
    scores_dir, out = Path(cfg.scores), Path(cfg.out)
    shards = score_shards(scores_dir)
    scores_manifest = io.read_json(scores_dir / io.MANIFEST)
    fingerprint = io.fingerprint_config({"config": {k: v for k, v in asdict(cfg).items() if k not in ("scores", "out")},
                                         "scores": scores_manifest.get("fingerprint"), "version": __version__})
    if not force and (done := io.is_done(out, fingerprint)):
        log(f"{out}: already pruned with these scores and settings; nothing to do (--force redoes it)")
        return done
    data_dir = out / "data"
    # Output shards are cheap to recompute from the scores; start clean so no stale shard survives.
    for old in list(data_dir.glob("*.parquet")) + [out / io.MANIFEST]:
        old.unlink(missing_ok=True)

    coords = collect_coordinates(shards, cfg.entropy_positions)
    chosen, summary = select(coords, cfg)
    kept = chosen.filter(pl.col("selection").is_not_null())
    fate = {r[0]: r[1:] for r in kept.select("id", "quadrant", "selection", "ppl", "ent").iter_rows()}
    kept_shards = sorted(set(kept["shard"].to_list()))
    log(f"EU plane: {coords.height:,} samples, keeping {kept.height:,}")

    loss_tokens, files = 0, []
    for j, shard_index in enumerate(kept_shards):
        table = pq.read_table(shards[shard_index], columns=["id", "messages", "input_ids", "trainable", "logprob",
                                                            "truncated"])
        pruned, n_loss = prune_rows(table, fate, cfg)
        name = f"train-{j:05d}-of-{len(kept_shards):05d}.parquet"
        io.write_parquet_atomic(pruned, data_dir / name, {"curate_version": __version__, "run_fingerprint": fingerprint})
        files.append(name)
        loss_tokens += n_loss

    samples = chosen.drop("nan_positions").with_columns(kept=pl.col("selection").is_not_null())
    samples.write_parquet(out / "samples.parquet")
    stats = build_stats(cfg, samples, summary, loss_tokens)
    io.write_json_atomic(out / "stats.json", stats)
    return io.write_manifest(
        out, "prune", fingerprint, started,
        inputs=[{"path": str(scores_dir), "fingerprint": scores_manifest.get("fingerprint")}],
        config={**asdict(cfg), "scores": str(scores_dir), "out": str(out)},
        counts={"samples_in": samples.height, "samples_out": stats["K"], "dropped": samples.height - stats["K"]},
        files=files, stats=stats,
    )


def build_stats(cfg: PruneConfig, samples: pl.DataFrame, summary: dict, loss_tokens: int) -> dict:
    kept = samples.filter(pl.col("kept"))
    trainable_all = int(samples["n_trainable"].sum())
    trainable_kept = int(kept["n_trainable"].sum())
    quadrants = Counter(samples["quadrant"].to_list())
    kept_quadrants = Counter(kept["quadrant"].to_list())
    return {
        "N": samples.height,
        "K": kept.height,
        **summary,
        "quadrants": {q: quadrants.get(q, 0) for q in ("Q1", "Q2", "Q3", "Q4")},
        "kept_by_quadrant": {q: kept_quadrants.get(q, 0) for q in ("Q1", "Q2", "Q3", "Q4")},
        "selection": dict(sorted(Counter(kept["selection"].to_list()).items())),
        "trainable_tokens": {"all_samples": trainable_all, "kept_samples": trainable_kept, "after": loss_tokens},
        "sample_ratio": kept.height / samples.height,
        "loss_token_ratio": loss_tokens / trainable_all if trainable_all else 0.0,
        "loss_token_ratio_in_kept": loss_tokens / trainable_kept if trainable_kept else 0.0,
        "config": asdict(cfg),
    }
