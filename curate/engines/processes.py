"""The local-processes engine: a sharded stage's shards on `workers` spawned processes of this machine, each with
one worker built once (stateless workers: prune's masks)."""

from __future__ import annotations

from ..progress import Reporter
from . import ShardProgress, ShardTask


def run(task: ShardTask, reporter: Reporter) -> tuple[dict, dict]:
    """({index: result} of the shards in `task.todo`, the engine's info)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    progress = ShardProgress(task, reporter)
    processes = min(task.resources.workers or 1, len(task.todo))
    results = {}
    try:
        if task.todo:
            # spawned, not forked: forking a process that runs polars' thread pool can deadlock
            ctx = multiprocessing.get_context("spawn")
            # the worker's factory (pickled by name), what it needs and where it writes: the declaration stays here
            start = (task.shards.worker, task.work, task.output)
            with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_start, initargs=start) as pool:
                futures = {pool.submit(_run_one, s): s for s in task.todo}
                for future in as_completed(futures):
                    shard, result = futures[future], future.result()
                    results[shard.index] = result
                    progress.finished(shard.index, result)
    finally:
        reporter.finish()
    return results, {"engine": "local", "workers": max(processes, 1)}


_WORKER = None  # in a worker process: the one worker it built


def _start(factory, work, output) -> None:
    global _WORKER
    _WORKER = factory(work, output, 0)


def _run_one(shard) -> dict:
    return _WORKER.run(shard, lambda units, tokens=0: None)
