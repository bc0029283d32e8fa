"""`curate score`: tokenise every conversation and score every token with the reference model.

Output: `OUT/part-NNNNN.parquet` (schema.SCORES), `OUT/_manifest.json` last. Shard i holds the usable rows among
input rows [i * shard_size, (i + 1) * shard_size), whichever engine wrote it, so an interrupted run recomputes
exactly the shards that are missing, and a run started on one engine can be finished on the other. A
`ShardWorker` does everything for one shard (read, convert, tokenise, score, check, write); the local engine
runs one in this process, the Ray engine one per actor (`curate.ray_engine`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import __version__, io, readers, schema
from ..config import ScoreConfig
from ..errors import CurateError, RowError
from ..extras import require_stages
from ..formats import DETECT_ROWS, Sample, Skip, detect_format, parse_fields, to_sample
from ..progress import Reporter
from . import base

MAX_SKIP_EXAMPLES = 20
LOGPROB_SLACK = 1e-3  # float rounding can put log p(token) a hair above 0
OUTPUTS = (schema.SCORES_GLOB,)


@dataclass(frozen=True)
class ScoreJob:
    """Everything a worker needs to produce any shard of this run (picklable, sent to Ray actors)."""

    cfg: ScoreConfig
    model_path: str
    model_name: str
    model_hash: str
    backend: str
    format: str  # resolved (never "auto")
    fingerprint: str


@dataclass
class ShardCounts:
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def skip(self, path: str, s: Skip) -> None:
        self.skipped[s.reason] += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append(
                {"file": path, "row": s.row, "field": s.field, "reason": s.reason, "message": s.message}
            )

    def as_dict(self) -> dict:
        return {"rows_read": self.rows_read, "skipped": dict(self.skipped), "examples": self.examples}


def score_problem(
    lp: np.ndarray, ent: np.ndarray, n: int, vocab_size: int, needed: np.ndarray | None = None
) -> str | None:
    """Why these scores are impossible (None when they are fine): lengths, finiteness, log p <= 0,
    0 <= entropy <= log V, at the `needed` positions (default: all but position 0, NaN by definition)."""
    if len(lp) != n or len(ent) != n:
        return f"{len(lp)} log-probs and {len(ent)} entropies for {n} tokens"
    keep = needed.astype(bool) if needed is not None else np.arange(n) > 0
    lp, ent = lp[keep].astype(np.float64), ent[keep].astype(np.float64)
    if not (np.isfinite(lp).all() and np.isfinite(ent).all()):
        return "non-finite log-prob or entropy"
    if (lp > LOGPROB_SLACK).any():
        return f"log-prob {lp.max():.4g} > 0"
    top = math.log(vocab_size) + 1e-3
    if (ent < -1e-3).any() or (ent > top).any():
        return f"entropy outside [0, log V = {top:.3f}] (min {ent.min():.4g}, max {ent.max():.4g})"
    return None


class ShardWorker:
    """Reads, tokenises, scores and writes shards of one job. The scorer is built on the first shard."""

    def __init__(self, job: ScoreJob, log=lambda msg: None):
        from ..models import load_tokenizer_from
        from ..tokenization import ChatEncoder, ensure_chat_template

        self.job, self.log = job, log
        self.tokenizer = load_tokenizer_from(job.model_path, job.model_name)
        ensure_chat_template(self.tokenizer)
        self.encoder = ChatEncoder(self.tokenizer, job.cfg.max_length)
        self.fields = parse_fields(job.cfg.fields)
        self.scorer = None
        self.timings = {"load": 0.0, "tokenise": 0.0, "write": 0.0}  # seconds: where a run's time goes

    def open(self):
        """Build the scorer (slow: loads the model); returns its entropy method."""
        if self.scorer is None:
            from ..backends import make_scorer

            t0 = time.time()
            self.scorer = make_scorer(self.job.backend, self.job.model_path, self.job.cfg, log=self.log)
            self.timings["load"] = time.time() - t0
        return self.scorer.entropy_method

    def time_spent(self) -> dict:
        """Seconds in model loading, tokenisation, the forward pass, the log-prob/entropy reduction and writing."""
        spent = {**self.timings, **getattr(self.scorer, "timings", {})}
        return {k: round(v, 3) for k, v in spent.items()}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None

    def tokenise(self, rows: readers.RowRange) -> tuple[list, ShardCounts]:
        """The usable samples of the range, tokenised, and the counts of what was read and skipped."""
        cfg, path = self.job.cfg, Path(self.job.cfg.input)
        counts, items = ShardCounts(), []
        for row, record in readers.read_range(path, rows):
            counts.rows_read += 1
            item = to_sample(row, record, self.job.format, self.fields, cfg.keep_fields)
            if isinstance(item, Sample):
                try:
                    items.append((item, self.encoder.encode(item.messages)))
                    continue
                except RowError as e:
                    item = Skip(row, e.reason, e.field, str(e))
            if cfg.on_bad_row == "fail":
                where = f", field {item.field!r}" if item.field else ""
                raise CurateError(
                    f"{path}, row {item.row}{where}: {item.message} [{item.reason}] "
                    "(use --on-bad-row skip to count and skip such rows)"
                )
            counts.skip(str(path), item)
        return items, counts

    def run(self, rows: readers.RowRange, on_batch=lambda rows, tokens: None, tokenised=None) -> dict:
        """Produce shard `rows.index` (atomically); returns its summary. `tokenised`: (items, counts) made ahead."""
        started = time.time()
        items, counts = tokenised or self.tokenise(rows)
        self.timings["tokenise"] += time.time() - started
        self.open()
        needed = [enc.trainable.astype(bool) for _, enc in items] if self.job.cfg.positions == "trainable" else None
        seqs = [enc.input_ids for _, enc in items]
        scores = self.scorer.score(seqs, on_batch=on_batch, needed=needed) if items else []
        kept_items, kept_scores = [], []
        for i, ((sample, enc), (lp, ent)) in enumerate(zip(items, scores)):
            problem = score_problem(lp, ent, len(enc.input_ids), self.scorer.vocab_size, needed and needed[i])
            if problem:  # a numerical failure of the model on this row, not a reason to stop the run
                counts.skip(
                    self.job.cfg.input, Skip(sample.row, "invalid_scores", None, f"sample {sample.id}: {problem}")
                )
                continue
            kept_items.append((sample, enc))
            kept_scores.append((lp, ent))
        t0 = time.time()
        table = shard_table(kept_items, kept_scores, self.job.cfg.keep_fields)
        tokens = sum(len(enc.input_ids) for _, enc in items)
        io.write_parquet_atomic(
            table, Path(self.job.cfg.out) / schema.scores_shard(rows.index), self.metadata(rows, counts)
        )
        self.timings["write"] += time.time() - t0
        return {
            "index": rows.index,
            "rows": counts.rows_read,
            "samples": table.num_rows,
            "tokens": tokens,
            "seconds": time.time() - started,
        }

    def metadata(self, rows: readers.RowRange, counts: ShardCounts) -> dict:
        job, scorer = self.job, self.scorer
        from ..tokenization import chat_template_hash

        meta = {
            "run_fingerprint": job.fingerprint,
            "model": job.model_name,
            "model_hash": job.model_hash,
            "tokenizer": job.model_name,
            "chat_template_hash": chat_template_hash(self.tokenizer),
            "backend": job.backend,
            "dtype": scorer.dtype,
            "entropy_method": scorer.entropy_method,
            "vocab_size": str(scorer.vocab_size),
            "max_length": str(job.cfg.max_length),
            "curate_version": __version__,
            "score_positions": job.cfg.positions,
            "input_rows": json.dumps([rows.start, rows.stop]),
            "counts": json.dumps(counts.as_dict()),
        }
        if scorer.entropy_max_error is not None:  # approximate entropies carry their error bound
            meta["entropy_max_error"] = str(scorer.entropy_max_error)
        return meta


def shard_schema(keep_fields: list[str]) -> pa.Schema:
    return pa.schema(list(schema.SCORES) + [pa.field(name, pa.string()) for name in keep_fields])


def shard_table(items: list, scores: list, keep_fields: list[str]) -> pa.Table:
    cols = {
        "id": [s.id for s, _ in items],
        "messages": [s.messages for s, _ in items],
        "input_ids": [e.input_ids for _, e in items],
        "trainable": [e.trainable for _, e in items],
        "logprob": [lp for lp, _ in scores],
        "entropy": [ent for _, ent in scores],
        "n_tokens": [len(e.input_ids) for _, e in items],
        "n_trainable": [int(e.trainable.sum()) for _, e in items],
        "truncated": [e.truncated for _, e in items],
        "content_hash": [s.content_hash for s, _ in items],
        **{name: [s.extra.get(name) for s, _ in items] for name in keep_fields},
    }
    return pa.Table.from_pydict(cols, schema=shard_schema(keep_fields))


# ---------------------------------------------------------------- the driver


def prepare(cfg: ScoreConfig, reporter: Reporter) -> tuple[ScoreJob, list[readers.RowRange], dict]:
    """Resolve the model, backend and format; plan the shards; fingerprint the run. No model is loaded."""
    from ..backends import choose_backend
    from ..models import resolve_model

    in_path = Path(cfg.input)
    readers.kind(in_path)  # exists and is a supported type
    base.check_not_input(Path(cfg.out), in_path)
    require_stages(("score", cfg))
    backend, why = choose_backend(cfg.backend, cfg.device)
    model = resolve_model(cfg.model, log=reporter.log)
    fmt = (
        cfg.format
        if cfg.format != "auto"
        else detect_format(in_path, readers.head(in_path, DETECT_ROWS), parse_fields(cfg.fields))
    )
    # Settings that change the numbers; engine and worker counts do not, so either engine can resume a run.
    ignore = {"out", "engine", "address", "num_workers", "gpus_per_worker", "cpus_per_worker", "tokenize_workers"}
    input_fingerprint = io.fingerprint_path(in_path)

    def fingerprint_with(dtype: str) -> str:
        identity = {k: v for k, v in cfg.model_dump().items() if k not in ignore}
        return io.fingerprint_config(
            {
                "config": {**identity, "dtype": dtype, "model": model.name, "backend": backend, "format": fmt},
                "input": input_fingerprint,
                "model": model.hash,
                "version": __version__,
            }
        )

    dtype, dtype_why = run_dtype(cfg, fingerprint_with)
    cfg = cfg.model_copy(update={"dtype": dtype})  # every worker, local or Ray, scores in the run's dtype
    fingerprint = fingerprint_with(dtype)
    job = ScoreJob(cfg, model.path, model.name, model.hash, backend, fmt, fingerprint)
    info = {
        "dtype": {"dtype": dtype, "why": dtype_why},
        "backend_choice": why,
        "input_fingerprint": input_fingerprint,
        "format": fmt,
        "model": {"name": model.name, "path": model.path, "hash": model.hash},
    }
    return job, readers.plan(in_path, cfg.shard_size, cfg.limit), info


def run_dtype(cfg: ScoreConfig, fingerprint_with) -> tuple[str, str]:
    """The dtype of this run, resolved once: `--dtype auto` follows the device and the CPU's bf16 support, except
    that a run already started in OUT with `auto` keeps the dtype it started with, whatever this machine would pick."""
    from ..backends import choose_dtype, cpu_bf16_feature

    if cfg.dtype != "auto":
        return cfg.dtype, "requested"
    from ..backends.hf import resolve_device

    device = resolve_device(cfg.device)
    dtype, why = choose_dtype("auto", device, None if device.startswith("cuda") else cpu_bf16_feature())
    for path in sorted(Path(cfg.out).glob("part-*.parquet"))[:1]:
        try:
            meta = io.parquet_metadata(path)
        except CurateError:
            continue
        earlier = meta.get("dtype")
        if earlier and earlier != dtype and meta.get("run_fingerprint") == fingerprint_with(earlier):
            return earlier, f"auto: {earlier}, as this run started (this machine would pick {dtype}: {why})"
    return dtype, why


def finished_shard(out: Path, index: int, fingerprint: str) -> bool:
    path = out / schema.scores_shard(index)
    if not path.exists():
        return False
    try:
        return io.parquet_metadata(path).get("run_fingerprint") == fingerprint
    except CurateError:  # unreadable: damaged on disk; it is scored again
        path.unlink()
        return False


def refuse_mixed_methods(out: Path, done: list[int], method: str) -> None:
    """A resumed run must compute entropies the way its finished shards did (exact vs top-k approximation)."""
    for i in done:
        path = out / schema.scores_shard(i)
        earlier = io.parquet_metadata(path).get("entropy_method")
        if earlier != method:
            raise CurateError(
                f"{path} holds entropies computed as {earlier!r} but this run computes {method!r}; "
                "a run never mixes methods: fix the cause or rerun with --force"
            )


def run(cfg: ScoreConfig, reporter: Reporter | None = None, force: bool = False) -> dict:
    """Score `cfg.input` into `cfg.out`; returns the manifest. A finished identical run is a no-op."""
    reporter = reporter or Reporter()
    started = time.time()
    out = Path(cfg.out)
    job, ranges, info = prepare(cfg, reporter)
    with io.locked(out, reporter.log):
        done_manifest = base.begin(
            out,
            "score",
            job.fingerprint,
            outputs=OUTPUTS,
            reporter=reporter,
            force=force,
            resumable=True,
            expensive=True,
        )
        if done_manifest:
            return done_manifest
        done = [r.index for r in ranges if finished_shard(out, r.index, job.fingerprint)]
        todo = [r for r in ranges if r.index not in set(done)]
        for stray in sorted(out.glob(schema.SCORES_GLOB)):  # e.g. left by an earlier, longer --limit of this run
            if int(stray.stem.split("-")[1]) >= len(ranges):
                stray.unlink()
        reporter.log(
            f"backend: {job.backend} ({info['backend_choice']}); dtype: {info['dtype']['dtype']} "
            f"({info['dtype']['why']}); model: {job.model_name}; format: {job.format}; engine: {cfg.engine}"
        )
        if done:
            reporter.log(f"resuming: {len(done)} of {len(ranges)} shards are already scored")
        if cfg.engine == "ray":
            from ..ray_engine import score_on_ray

            engine_info = score_on_ray(job, todo, done, ranges, reporter)
        else:
            engine_info = score_locally(job, todo, done, ranges, reporter)
        return finalize(job, ranges, info, engine_info, started)


def batch_progress(reporter: Reporter, rows: int, tokens: int):
    """An on_batch callback that advances the bar from where this shard started (scored rows and tokens)."""
    done = [rows, tokens]

    def on_batch(batch_rows: int, batch_tokens: int) -> None:
        done[0] += batch_rows
        done[1] += batch_tokens
        reporter.advance(*done)

    return on_batch


_TOKENISER: ShardWorker | None = None  # in a tokenising process: the worker whose tokenizer it uses


def _start_tokeniser(job: ScoreJob) -> None:
    global _TOKENISER
    _TOKENISER = ShardWorker(job)


def _tokenise_ahead(rows: readers.RowRange) -> tuple[list, ShardCounts]:
    return _TOKENISER.tokenise(rows)


def tokenise_workers(cfg: ScoreConfig) -> int:
    """Tokenising processes for the local engine: none on CPUs (they would share the scorer's cores); with a GPU,
    enough to keep a small model's scoring rate fed (BENCHMARKS.md: a core tokenises ~100k tokens/s)."""
    if cfg.tokenize_workers is not None:
        return cfg.tokenize_workers
    from ..backends.hf import resolve_device

    gpu = resolve_device(cfg.device).startswith("cuda")
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if gpu else 0


def tokenised_shards(job: ScoreJob, todo: list, workers: int):
    """(shard, None) in order, or (shard, (items, counts)) tokenised by `workers` processes ahead of scoring."""
    if not workers or len(todo) < 2:
        yield from ((r, None) for r in todo)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_tokeniser, initargs=(job,)) as pool:
        ahead = deque((r, pool.submit(_tokenise_ahead, r)) for r in todo[: workers + 1])
        upcoming = iter(todo[workers + 1 :])
        while ahead:
            r, future = ahead.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(_tokenise_ahead, nxt)))
            yield r, future.result()


def score_locally(job: ScoreJob, todo, done, ranges, reporter: Reporter) -> dict:
    total_rows = sum(r.stop - r.start for r in ranges)
    rows_done = sum(ranges[i].stop - ranges[i].start for i in done)
    reporter.start("score", total_rows)
    reporter.advance(rows_done, 0)
    worker = ShardWorker(job, log=reporter.log) if todo else None
    tokens, seconds, timings = 0, 0.0, {}
    try:
        if worker:
            refuse_mixed_methods(Path(job.cfg.out), done, worker.open())
        for r, tokenised in tokenised_shards(job, todo, tokenise_workers(job.cfg)):
            result = worker.run(r, batch_progress(reporter, rows_done, tokens), tokenised)
            rows_done += r.stop - r.start
            tokens += result["tokens"]
            seconds += result["seconds"]
            reporter.advance(rows_done, tokens)
        if worker:
            timings = worker.time_spent()
    finally:
        if worker:
            worker.close()
        reporter.finish()
    rate = round(tokens / seconds, 1) if seconds else None
    return {
        "engine": "local",
        "workers": 1,
        "tokens_scored_this_run": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": rate,
        "worker_tokens_per_s": [rate] if rate else [],
        "time_spent_s": timings,
    }


# ---------------------------------------------------------------- finishing: duplicates and the manifest


def drop_rows(path: Path, drop: dict[int, str], examples: list) -> None:
    """Rewrite one shard without the rows at these positions (reason per row), counting them as skipped."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = io.parquet_metadata(path)
    counts = json.loads(meta["counts"])
    ids = table.column("id").to_pylist()
    for pos, reason in drop.items():
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append({"file": path.name, "sample": ids[pos], "reason": reason})
    keep = np.ones(table.num_rows, dtype=bool)
    keep[list(drop)] = False
    meta["counts"] = json.dumps(counts)
    io.write_parquet_atomic(table.filter(pa.array(keep)), path, meta)


def deduplicate(out: Path, ranges, dedup: bool) -> dict:
    """Later rows with an id already used are dropped (duplicate_id); identical conversations are counted, and
    with --dedup their later copies dropped (duplicate_content). Idempotent, so a rerun after a crash is safe."""
    import pyarrow.parquet as pq

    seen_ids, seen_content, groups = set(), {}, Counter()
    drops: dict[int, dict[int, str]] = {}
    for r in ranges:
        table = pq.read_table(out / schema.scores_shard(r.index), columns=["id", "content_hash"])
        for pos, (sid, digest) in enumerate(
            zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist())
        ):
            if sid in seen_ids:
                drops.setdefault(r.index, {})[pos] = "duplicate_id"
                continue
            seen_ids.add(sid)
            if digest in seen_content:
                groups[seen_content[digest]] += 1
                if dedup:
                    drops.setdefault(r.index, {})[pos] = "duplicate_content"
            else:
                seen_content[digest] = sid
    examples: list = []
    for index, drop in sorted(drops.items()):
        drop_rows(out / schema.scores_shard(index), drop, examples)
    return {
        "duplicate_content": {
            "groups": len(groups),
            "later_copies": sum(groups.values()),
            "dropped": dedup,
            "first_ids": sorted(groups)[:MAX_SKIP_EXAMPLES],
        },
        "examples": examples,
    }


def finalize(job: ScoreJob, ranges, info: dict, engine_info: dict, started: float) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out, cfg = Path(job.cfg.out), job.cfg
    duplicates = deduplicate(out, ranges, cfg.dedup)
    names = [schema.scores_shard(r.index) for r in ranges]
    metas = [io.parquet_metadata(out / n) for n in names]
    skipped, examples, rows_read = Counter(), [], 0
    for m in metas:
        c = json.loads(m["counts"])
        rows_read += c["rows_read"]
        skipped.update(c["skipped"])
        examples += c["examples"][: MAX_SKIP_EXAMPLES - len(examples)]
    table = pq.read_table([out / n for n in names], columns=["n_tokens", "n_trainable", "truncated"])
    samples = table.num_rows
    if samples == 0:
        raise CurateError(f"{cfg.input}: no usable rows (skipped: {dict(skipped) or 'none read'})")
    entropy = {"method": metas[0]["entropy_method"]}
    errors = [float(m["entropy_max_error"]) for m in metas if "entropy_max_error" in m]
    if errors:
        entropy["topk_max_error_nats"] = round(max(errors), 6)  # half-width of the widest tail-mass bound
    files = [io.file_entry(out, n, rows=pq.read_metadata(out / n).num_rows) for n in names]
    return io.write_manifest(
        out,
        "score",
        job.fingerprint,
        started,
        files=files,
        inputs=[{"path": cfg.input, "fingerprint": info["input_fingerprint"]}],
        config={**cfg.model_dump(), "model": job.model_name, "backend": job.backend, "format": job.format},
        backend_choice=info["backend_choice"],
        dtype=info["dtype"],
        entropy=entropy,
        model=info["model"],
        vocab_size=int(metas[0]["vocab_size"]),
        keep_fields=cfg.keep_fields,
        score_positions=cfg.positions,
        counts={
            "rows_read": rows_read,
            "samples": samples,
            "skipped": sum(skipped.values()),
            "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
            "tokens": int(pc.sum(table.column("n_tokens")).as_py()),
            "trainable_tokens": int(pc.sum(table.column("n_trainable")).as_py()),
        },
        skipped_by_reason=dict(skipped),
        skipped_examples=examples + duplicates["examples"],
        duplicates=duplicates["duplicate_content"],
        scoring=engine_info,
    )
