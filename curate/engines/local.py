"""The local engine: the shards of a scoring run in this process, with optional tokenising processes ahead."""

from __future__ import annotations

import os

from .. import readers
from ..config import ScoreConfig
from ..progress import Reporter
from .shard import ScoreJob, ShardCounts, ShardWorker, refuse_mixed_methods


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
    from ..backends import resolve_device

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
            refuse_mixed_methods(job.out(), done, worker.open())
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
