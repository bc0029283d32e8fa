"""The scoring worker: everything for one shard of a scoring run (read its input rows, convert, tokenise, score,
check, write), whichever engine runs it. The score stage declares it as its shards' worker; a library, it imports
no stage, and no engine imports it."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from . import __version__, io, readers, schema
from .config.score import ScoreConfig
from .errors import CurateError, RowError
from .formats import Sample, Skip, parse_fields, to_sample
from .schema import ENTROPY_SLACK, LOGPROB_SLACK
from .stage import Worker

MAX_SKIP_EXAMPLES = 20


@dataclass(frozen=True)
class ScoreJob:
    """Everything a worker needs to produce any shard of this run (picklable, sent to Ray actors)."""

    cfg: ScoreConfig
    model_path: str
    model_name: str
    model_hash: str
    backend: str
    format: str  # resolved (never "auto")
    source: readers.Source | None = None  # the input's files (default: cfg.input, one file)
    resumed: tuple[int, ...] = ()  # the shards an earlier attempt of this run finished: their entropy method holds

    def input(self) -> readers.Source:
        return self.source or readers.as_source(self.cfg.input)


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
    0 <= entropy <= log V, at the `needed` positions (default: all but position 0, NaN by definition). The same
    rule, with the same tolerances, as `pruning.eu_coordinates` applies when the scores are read."""
    if len(lp) != n or len(ent) != n:
        return f"{len(lp)} log-probs and {len(ent)} entropies for {n} tokens"
    keep = needed.astype(bool) if needed is not None else np.arange(n) > 0
    lp, ent = lp[keep].astype(np.float64), ent[keep].astype(np.float64)
    if not (np.isfinite(lp).all() and np.isfinite(ent).all()):
        return "non-finite log-prob or entropy"
    if (lp > LOGPROB_SLACK).any():
        return f"log-prob {lp.max():.4g} > 0"
    top = math.log(vocab_size) + ENTROPY_SLACK
    if (ent < -ENTROPY_SLACK).any() or (ent > top).any():
        return f"entropy outside [0, log V = {top:.3f}] (min {ent.min():.4g}, max {ent.max():.4g})"
    return None


class ShardWorker(Worker):
    """Reads, tokenises, scores and writes shards of one job. The scorer is built on the first shard."""

    def __init__(self, job: ScoreJob, output=None, log=lambda msg: None):
        """`output`: the executor's `ShardOutput`, where shards are written (none for a process that only
        tokenises)."""
        from .models import load_tokenizer_from
        from .tokenization import ChatEncoder, ensure_chat_template

        self.job, self.output, self.log = job, output, log
        self.tokenizer = load_tokenizer_from(job.model_path, job.model_name)
        ensure_chat_template(self.tokenizer)
        self.encoder = ChatEncoder(self.tokenizer, job.cfg.max_length)
        self.fields = parse_fields(job.cfg.fields)
        self.scorer = None
        self.timings = {"load": 0.0, "tokenise": 0.0, "write": 0.0}  # seconds: where a run's time goes

    def open(self):
        """Build the scorer (slow: loads the model); returns its entropy method, which must be the one of the
        shards this run finished before (a run never mixes exact and approximate entropies)."""
        if self.scorer is None:
            from .backends import make_scorer

            t0 = time.time()
            self.scorer = make_scorer(self.job.backend, self.job.model_path, self.job.cfg, log=self.log)
            self.timings["load"] = time.time() - t0
            refuse_mixed_methods(self.output.folder, list(self.job.resumed), self.scorer.entropy_method)
        return self.scorer.entropy_method

    def stream(self, todo: list, progress_for):
        """(shard, result) for each of `todo` in order, the next shards tokenised ahead by worker processes where the
        run has them (a GPU scores faster than one core tokenises)."""
        self.open()
        for rows, tokenised in tokenised_shards(self.job, todo, tokenise_workers(self.job.cfg)):
            yield rows, self.run(rows, progress_for(rows), tokenised)

    def info(self) -> dict:
        return {"time_spent_s": self.time_spent()}

    def time_spent(self) -> dict:
        """Seconds in model loading, tokenisation, the forward pass, the log-prob/entropy reduction and writing."""
        spent = {**self.timings, **(self.scorer.timings if self.scorer else {})}
        return {k: round(v, 3) for k, v in spent.items()}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None

    def tokenise(self, rows: readers.RowRange) -> tuple[list, ShardCounts]:
        """The usable samples of the range, tokenised, and the counts of what was read and skipped."""
        cfg, source = self.job.cfg, self.job.input()
        path = readers.file_of(source, rows)
        counts, items = ShardCounts(), []
        for row, record in readers.read_range(source, rows, cfg.max_row_bytes):
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

    def run(self, rows: readers.RowRange, on_batch=lambda rows, tokens=0: None, tokenised=None) -> dict:
        """Produce shard `rows.index` (atomically); returns its summary. `tokenised`: (items, counts) made ahead."""
        started = time.time()
        items, counts = tokenised or self.tokenise(rows)
        self.timings["tokenise"] += time.time() - started
        self.open()
        needed = [enc.trainable.astype(bool) for _, enc in items] if self.job.cfg.positions == "trainable" else None
        seqs = [enc.input_ids for _, enc in items]
        alone = self.answers_alone(items) if "ifd" in self.job.cfg.signals else None
        if alone is not None:  # two passes: rows advance with the tokens of both, not 99% done before the second
            total = sum(len(s) for s in seqs) + sum(len(s) for _, s in alone)
            on_batch = RowsByTokens(on_batch, len(items), total)
        scores = self.scorer.score(seqs, on_batch=on_batch, needed=needed) if items else []
        kept_items, kept_scores, kept = [], [], []
        for i, ((sample, enc), (lp, ent)) in enumerate(zip(items, scores)):
            problem = score_problem(lp, ent, len(enc.input_ids), self.scorer.vocab_size, needed and needed[i])
            if problem:  # a numerical failure of the model on this row, not a reason to stop the run
                counts.skip(
                    readers.file_of(self.job.input(), rows),
                    Skip(sample.row, "invalid_scores", None, f"sample {sample.id}: {problem}"),
                )
                continue
            kept_items.append((sample, enc))
            kept_scores.append((lp, ent))
            kept.append(i)
        if alone is not None:
            alone = self.score_alone(alone, kept, on_batch)
        t0 = time.time()
        table = shard_table(kept_items, kept_scores, self.job.cfg.keep_fields, alone)
        tokens = sum(len(enc.input_ids) for _, enc in items)
        name = schema.scores_shard(rows.index)
        self.output.write_parquet(name, table, self.metadata(rows, counts))
        self.timings["write"] += time.time() - t0
        return {
            # written on another machine maybe: what the driver needs of it comes back with the result
            **({"summary": shard_summary(self.output.folder, name)} if self.output.url else {}),
            "index": rows.index,
            "rows": counts.rows_read,
            "samples": table.num_rows,
            "tokens": tokens,
            "seconds": time.time() - started,
        }

    def answers_alone(self, items: list) -> list[tuple[int, np.ndarray]]:
        """`score --signals ifd`: every assistant turn's text by itself, tokenised with the tokenizer's defaults and
        no chat template (Superfiltering's whole text), as (index of its sample, token ids); turns of one token have
        no perplexity and are left out."""
        turns = []
        for i, (sample, _) in enumerate(items):
            for m in sample.messages:
                if m["role"] == "assistant":
                    ids = self.tokenizer(m["content"])["input_ids"][: self.job.cfg.max_length]
                    if len(ids) > 1:
                        turns.append((i, np.asarray(ids, dtype=np.int32)))
        return turns

    def score_alone(self, turns: list, kept: list[int], on_batch) -> list[tuple[float | None, int]]:
        """Per kept sample (`kept`: indices into the shard's items), the summed NLL of its `turns` over their tokens
        after the first, and the token count, pooled over the turns (None, 0 when it has no such turn)."""
        position = {item: k for k, item in enumerate(kept)}
        turns = [(position[i], ids) for i, ids in turns if i in position]
        seqs = [ids for _, ids in turns]
        progress = lambda rows, tokens: on_batch(0, tokens)  # rows advance by tokens (RowsByTokens)
        if not seqs:
            scores = []
        elif getattr(self.scorer, "name", "") == "hf":  # log-probs only: the entropies of the answers alone go unused
            scores = self.scorer.score(seqs, on_batch=progress, entropy=False)
        else:
            scores = self.scorer.score(seqs, on_batch=progress)
        total, count = [0.0] * len(kept), [0] * len(kept)
        for (k, _), (lp, _) in zip(turns, scores):
            total[k] -= float(np.asarray(lp[1:], dtype=np.float64).sum())
            count[k] += len(lp) - 1
        return [(t, n) if n and math.isfinite(t) else (None, 0) for t, n in zip(total, count)]

    def metadata(self, rows: readers.RowRange, counts: ShardCounts) -> dict:
        job, scorer = self.job, self.scorer
        from .tokenization import chat_template_hash

        meta = {
            "model": job.model_name,
            "model_hash": job.model_hash,
            "tokenizer": job.model_name,
            "chat_template_hash": chat_template_hash(self.tokenizer),
            "tool_rendering": self.encoder.tool_rendering,
            "backend": job.backend,
            "dtype": scorer.dtype,
            "entropy_method": scorer.entropy_method,
            "vocab_size": str(scorer.vocab_size),
            "max_length": str(job.cfg.max_length),
            "curate_version": __version__,
            "score_positions": job.cfg.positions,
            "input_rows": json.dumps([rows.start, rows.stop]),
            **(
                {"input_file": PurePosixPath(readers.file_of(job.input(), rows)).name}
                if len(job.input().files) > 1
                else {}
            ),
            "counts": json.dumps(counts.as_dict()),
        }
        if scorer.entropy_max_error is not None:  # approximate entropies carry their error bound
            meta["entropy_max_error"] = str(scorer.entropy_max_error)
        return meta


class RowsByTokens:
    """A progress callback for work done in more than one pass over the same rows: it passes the tokens on and
    turns them into rows, `rows` in all once `total` tokens are done, so a bar moves with the work, not to 99%
    in the first pass and stands still through the next."""

    def __init__(self, on_batch, rows: int, total: int):
        self.on_batch, self.rows, self.total = on_batch, rows, max(total, 1)
        self.tokens = self.reported = 0

    def __call__(self, rows: int, tokens: int = 0) -> None:
        self.tokens += tokens
        done = min(self.rows, self.rows * self.tokens // self.total)
        self.on_batch(done - self.reported, tokens)
        self.reported = done


def shard_summary(folder: Path, name: str) -> dict:
    """What the driver needs of a finished shard, read once where it was written: its manifest entry (size,
    checksum, rows), its metadata, its ids and content hashes (for the duplicate pass) and its token counts. A Ray
    worker sends it back, so a driver on another machine never downloads the shard."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(folder / name, columns=["id", "content_hash", "n_tokens", "n_trainable", "truncated"])
    return {
        "entry": io.file_entry(folder, name, rows=table.num_rows),
        "meta": io.parquet_metadata(folder / name),
        "ids": table.column("id").to_pylist(),
        "content_hash": table.column("content_hash").to_pylist(),
        "tokens": int(pc.sum(table.column("n_tokens")).as_py() or 0),
        "trainable": int(pc.sum(table.column("n_trainable")).as_py() or 0),
        "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
    }


def shard_schema(keep_fields: list[str], signals: list[str] = ()) -> pa.Schema:
    alone = schema.ALONE if "ifd" in signals else []
    return pa.schema(list(schema.SCORES) + alone + [pa.field(name, pa.string()) for name in keep_fields])


def shard_table(items: list, scores: list, keep_fields: list[str], alone: list | None = None) -> pa.Table:
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
        **({"alone_nll": [a[0] for a in alone], "alone_tokens": [a[1] for a in alone]} if alone is not None else {}),
        **{name: [s.extra.get(name) for s, _ in items] for name in keep_fields},
    }
    return pa.Table.from_pydict(cols, schema=shard_schema(keep_fields, ["ifd"] if alone is not None else []))


# ---------------------------------------------------------------- workers, wherever they run


def score_worker(job: ScoreJob, output, gpus: float = 0) -> ShardWorker:
    """The scoring worker of `curate.stage.Shards` (local or in a Ray actor, maybe on another machine): the model
    on this node (the built-in one converted here, one given as a URL fetched and checked by its hash), and with
    vLLM on several GPUs, tensor parallelism over them."""
    from dataclasses import replace

    from .models import BUILTIN_LABEL, ensure_builtin, model_on_this_node

    if job.model_name == BUILTIN_LABEL and not Path(job.model_path).exists():
        job = replace(job, model_path=str(ensure_builtin()))
    elif job.cfg.model:
        job = replace(job, model_path=model_on_this_node(job.cfg.model, job.model_path, job.model_hash))
    if job.backend == "vllm" and gpus > 1:
        job = replace(job, cfg=job.cfg.model_copy(update={"tensor_parallel_size": int(gpus)}))
    return ShardWorker(job, output)


_TOKENISER: ShardWorker | None = None  # in a tokenising process: the worker whose tokenizer it uses


def _start_tokeniser(job: ScoreJob) -> None:
    global _TOKENISER
    _TOKENISER = ShardWorker(job)


def _tokenise_ahead(rows: readers.RowRange) -> tuple[list, ShardCounts]:
    return _TOKENISER.tokenise(rows)


def tokenise_workers(cfg: ScoreConfig) -> int:
    """Tokenising processes for the local engine: none on CPUs (they would share the scorer's cores); with a GPU,
    enough to keep a small model's scoring rate fed (BENCHMARKS.md: a core tokenises ~100k tokens/s)."""
    import os

    if cfg.tokenize_workers is not None:
        return cfg.tokenize_workers
    from .backends import resolve_device

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


# ---------------------------------------------------------------- the driver


def refuse_mixed_methods(out: Path, done: list[int], method: str) -> None:
    """A resumed run must compute entropies the way its finished shards did (exact vs top-k approximation)."""
    for i in done:
        path = out / schema.scores_shard(i)
        if not path.exists():  # on a Ray node whose working copy does not hold it: the driver's node checks it
            continue
        earlier = io.parquet_metadata(path).get("entropy_method")
        if earlier != method:
            raise CurateError(
                f"{path} holds entropies computed as {earlier!r} but this run computes {method!r}; "
                "a run never mixes methods: fix the cause or rerun with --force"
            )
