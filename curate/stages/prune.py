"""`curate prune`: place samples on the EU plane, keep an exact budget, mask noisy tokens.

Two passes so memory does not grow with the token count: pass 1 reads only per-sample statistics from every
scores shard (checking every value on the way); pass 2 rewrites one shard at a time with the loss masks of the
kept samples, in `--workers` processes when asked (the files are the same either way).
Output: `OUT/data/train-NNNNN-of-MMMMM.parquet` (schema.PRUNED), `OUT/samples.parquet` (every input sample,
its coordinates, quadrant and fate), `OUT/stats.json`, and `OUT/_manifest.json` last.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io, pruning, schema
from ..config import PruneConfig
from ..errors import CurateError
from ..extras import require_stages
from ..progress import Reporter
from . import base

OUTPUTS = (schema.PRUNED_DATA, schema.SAMPLES, schema.STATS)
TARGET = "target"  # with --target-model: the kept samples in the target model's tokens
SCORES_HINT = "run `curate score` into it first"


def score_files(scores_dir: Path, manifest: dict) -> list[Path]:
    return [scores_dir / f["name"] for f in manifest["files"]]


# ---------------------------------------------------------------- pass 1: the plane and the triage


def collect_coordinates(
    shards: list[Path], cfg: PruneConfig, vocab_size: int | None, positions: str = "all"
) -> pl.DataFrame:
    """id, ppl, ent, n_trainable, shard (and group) of every sample; every score checked on the way."""
    frames = []
    extra = [cfg.group_by] if cfg.group_by else []
    for i, path in enumerate(shards):
        try:
            df = pl.read_parquet(path, columns=["id", "n_tokens", "trainable", "logprob", "entropy", *extra])
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
        coords = coords.drop("problem").with_columns(shard=pl.lit(i, pl.Int32))
        if extra:
            coords = coords.with_columns(group=df[cfg.group_by].fill_null("(none)"))
        frames.append(coords)
    coords = pl.concat(frames)
    dup = coords.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise CurateError(f"scores contain the id {dup['id'][0]!r} more than once; ids must be unique")
    return coords


def partitions(coords: pl.DataFrame, cfg: PruneConfig) -> np.ndarray:
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


def select(coords: pl.DataFrame, cfg: PruneConfig) -> tuple[pl.DataFrame, dict]:
    """Adds quadrant, batch and selection columns; returns them with the triage summary."""
    ids = coords["id"].to_numpy().astype(str)
    ppl, ent = coords["ppl"].to_numpy(), coords["ent"].to_numpy()
    groups = coords["group"].to_numpy() if "group" in coords.columns else None
    median = pruning.medians(ppl, ent)
    quadrant = pruning.quadrant_labels(ppl, ent, median)
    selection = np.full(len(ids), None, dtype=object)
    part = partitions(coords, cfg)
    alphas, thresholds = [], None
    # One stable sort groups every partition's indices (ascending) without an O(N) scan per partition.
    order = np.argsort(part, kind="stable")
    starts = np.flatnonzero(np.diff(part[order], prepend=-1))
    for idx in np.split(order, starts[1:]):
        ratio = cfg.group_ratios.get(groups[idx[0]], cfg.ratio) if groups is not None else cfg.ratio
        k = pruning.budget(ratio, len(idx))
        result = pruning.triage(cfg.strategy, ids[idx], ppl[idx], ent[idx], k, cfg.seed + int(part[idx[0]]), cfg.fill)
        selection[idx] = result.selection
        if result.alpha is not None:
            alphas.append(result.alpha)
        thresholds = result.thresholds
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
        if pruning.prunes_tokens(selection):
            mask = pruning.token_keep_mask(
                np.asarray(data["logprob"][i], dtype=np.float32),
                trainable,
                truncated=data["truncated"][i],
                token_ratio=cfg.token_ratio,
                lam=cfg.lam,
                order=cfg.token_order,
                strategy=cfg.token_strategy,
                seed=pruning.sample_seed(cfg.seed, sid),
            )
        else:
            mask = trainable.copy()
        labels = np.where(mask == 1, ids, schema.IGNORE_INDEX).astype(np.int32)
        loss_tokens += int(mask.sum())
        for name, value in (
            ("id", sid),
            ("messages", data["messages"][i]),
            ("input_ids", ids),
            ("attention_mask", np.ones(len(ids), dtype=np.int8)),
            ("labels", labels),
            ("loss_mask", mask),
            ("assistant_masks", mask),
            ("quadrant", quadrant),
            ("selection", selection),
            ("ppl", ppl),
            ("ent", ent),
        ):
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=schema.PRUNED), loss_tokens


def write_pruned_shard(task: tuple) -> int:
    """Pass 2 for one scores shard (a top-level function, so worker processes can run it)."""
    source, target, fate, cfg, fingerprint = task
    table = pq.read_table(source, columns=["id", "messages", "input_ids", "trainable", "logprob", "truncated"])
    pruned, n_loss = prune_rows(table, fate, cfg)
    io.write_parquet_atomic(pruned, target, {"curate_version": __version__, "run_fingerprint": fingerprint})
    return n_loss


def write_masks(tasks: list[tuple], cfg: PruneConfig, reporter: Reporter) -> list[int]:
    """Pass 2 over the kept shards: in this process, in `workers` local processes, or as Ray tasks."""
    if cfg.engine == "ray":
        from ..ray_engine import run_tasks

        return run_tasks(write_pruned_shard, tasks, cfg.address, reporter)
    if cfg.workers <= 1 or len(tasks) <= 1:
        return [write_pruned_shard(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: forking a process that has polars' thread pool running can deadlock.
    with ProcessPoolExecutor(min(cfg.workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(write_pruned_shard, tasks))


def run(cfg: PruneConfig, reporter: Reporter | None = None, force: bool = False) -> dict:
    reporter = reporter or Reporter()
    started = time.time()
    scores_dir, out = Path(cfg.scores), Path(cfg.out)
    base.check_not_input(out, scores_dir)
    require_stages(("prune", cfg))
    scores_manifest = io.verified(scores_dir, "score", SCORES_HINT)
    if cfg.group_by and cfg.group_by not in scores_manifest.get("keep_fields", []):
        raise CurateError(
            f"--group-by {cfg.group_by}: the scores in {scores_dir} do not carry that field; score with "
            f"--keep-fields {cfg.group_by}"
        )
    # settings that change the pruned data (target_model only adds OUT/target, a stage of its own)
    settings = cfg.model_dump(exclude={"scores", "out", "workers", "engine", "address", "target_model"})
    fingerprint = io.fingerprint_config(
        {"config": settings, "scores": scores_manifest["fingerprint"], "version": __version__}
    )
    with io.locked(out, reporter.log):
        manifest = base.begin(out, "prune", fingerprint, outputs=OUTPUTS, reporter=reporter, force=force)
        manifest = manifest or write_pruned(cfg, scores_dir, scores_manifest, fingerprint, started, reporter)
    if cfg.target_model:
        from ..config import RetokenizeConfig
        from . import retokenize

        retokenize.run(
            RetokenizeConfig(pruned=str(out), model=cfg.target_model, out=str(out / TARGET)), reporter, force
        )
    return manifest


def write_pruned(
    cfg: PruneConfig, scores_dir: Path, scores_manifest: dict, fingerprint: str, started: float, reporter: Reporter
) -> dict:
    out = Path(cfg.out)
    positions = scores_manifest.get("score_positions", "all")
    if positions == "trainable" and cfg.entropy_positions == "all":
        raise CurateError(
            f"{scores_dir} holds scores of the trainable tokens only; --entropy-positions all needs the "
            "prompt's too: rescore with --positions all"
        )
    shards = score_files(scores_dir, scores_manifest)
    coords = collect_coordinates(shards, cfg, scores_manifest.get("vocab_size"), positions)
    chosen, summary = select(coords, cfg)
    kept = chosen.filter(pl.col("selection").is_not_null())
    kept_shards = sorted(set(kept["shard"].to_list()))
    reporter.log(f"EU plane: {coords.height:,} samples, keeping {kept.height:,}")
    names = [schema.pruned_shard(j, len(kept_shards)) for j in range(len(kept_shards))]
    tasks = []
    for name, shard in zip(names, kept_shards):
        part = kept.filter(pl.col("shard") == shard).select("id", "quadrant", "selection", "ppl", "ent")
        fate = {r[0]: r[1:] for r in part.iter_rows()}
        tasks.append((shards[shard], out / name, fate, cfg, fingerprint))
    loss_tokens = sum(write_masks(tasks, cfg, reporter))

    samples = chosen.with_columns(kept=pl.col("selection").is_not_null())
    samples.write_parquet(out / schema.SAMPLES)
    stats = build_stats(cfg, samples, summary, loss_tokens)
    io.write_json_atomic(out / schema.STATS, stats)
    files = [io.file_entry(out, n) for n in (*names, schema.SAMPLES, schema.STATS)]
    return io.write_manifest(
        out,
        "prune",
        fingerprint,
        started,
        files=files,
        inputs=[{"path": str(scores_dir), "stage": "score", "fingerprint": scores_manifest["fingerprint"]}],
        config=cfg.model_dump(),
        model=scores_manifest["model"],
        counts={"samples_in": samples.height, "samples_out": stats["K"], "dropped": samples.height - stats["K"]},
        stats=stats,
    )


def build_stats(cfg: PruneConfig, samples: pl.DataFrame, summary: dict, loss_tokens: int) -> dict:
    kept = samples.filter(pl.col("kept"))
    trainable_all = int(samples["n_trainable"].sum())
    trainable_kept = int(kept["n_trainable"].sum())
    quadrants = Counter(samples["quadrant"].to_list())
    kept_quadrants = Counter(kept["quadrant"].to_list())
    stats = {
        "N": samples.height,
        "K": kept.height,
        **summary,
        "quadrants": {q: quadrants.get(q, 0) for q in schema.QUADRANTS},
        "kept_by_quadrant": {q: kept_quadrants.get(q, 0) for q in schema.QUADRANTS},
        "selection": dict(sorted(Counter(kept["selection"].to_list()).items())),
        "trainable_tokens": {"all_samples": trainable_all, "kept_samples": trainable_kept, "after": loss_tokens},
        "sample_ratio": kept.height / samples.height,
        "loss_token_ratio": loss_tokens / trainable_all if trainable_all else 0.0,
        "loss_token_ratio_in_kept": loss_tokens / trainable_kept if trainable_kept else 0.0,
        "config": cfg.model_dump(),
    }
    if "group" in samples.columns:
        per = samples.group_by("group").agg(N=pl.len(), K=pl.col("kept").sum()).sort("group")
        stats["groups"] = {
            g: {"N": n, "K": k, "ratio": cfg.group_ratios.get(g, cfg.ratio)} for g, n, k in per.iter_rows()
        }
    return stats
