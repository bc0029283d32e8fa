"""The local engine: a sharded stage's shards in this process (a stateful worker: a loaded model), or in local worker
processes (stateless workers: prune's masks). The executor decides which shards are left; this runs them and draws
the progress; it never imports a stage."""

from __future__ import annotations

from ..progress import Reporter


def progress_from(reporter: Reporter, base: list[int]):
    """`progress_for(shard)`: a callback adding a shard's units and tokens, as they come, to what is done."""

    def progress_for(shard):
        partial = [0, 0]

        def progress(units: int, tokens: int = 0) -> None:
            partial[0] += units
            partial[1] += tokens
            reporter.advance(base[0] + partial[0], base[1] + partial[1])

        return progress

    return progress_for


def run_shards(label: str, sh, work, output, shards: list, todo: list, cfg, reporter: Reporter) -> tuple[dict, dict]:
    """({index: result} of the shards in `todo`, the engine's info)."""
    sizes = {s.index: sh.size(s) for s in shards}
    left = {s.index for s in todo}
    base = [sum(n for i, n in sizes.items() if i not in left), 0]  # units and tokens done
    reporter.start(label, sum(sizes.values()), sh.unit)
    reporter.advance(*base)
    results, info, processes = {}, {}, min(sh.local_workers(cfg), len(todo))
    try:
        if processes > 1:
            for shard, result in _in_processes(sh.worker, work, output, todo, processes):
                results[shard.index] = result
                base[0] += sizes[shard.index]
                reporter.advance(*base)
        elif todo:
            worker = sh.worker(work, output, 0)
            try:
                progress_for = progress_from(reporter, base)
                if hasattr(worker, "stream"):
                    stream = worker.stream(todo, progress_for)
                else:
                    stream = ((s, worker.run(s, progress_for(s))) for s in todo)
                for shard, result in stream:
                    results[shard.index] = result
                    base[0] += sizes[shard.index]
                    base[1] += result.get("tokens", 0)
                    reporter.advance(*base)
                info = worker.info() if hasattr(worker, "info") else {}
            finally:
                worker.close()
    finally:
        reporter.finish()
    return results, {"engine": "local", "workers": max(processes, 1), **info}


_WORKER = None  # in a worker process: the one worker it built


def _start(factory, work, output) -> None:
    global _WORKER
    _WORKER = factory(work, output, 0)


def _run_one(shard) -> dict:
    return _WORKER.run(shard, lambda units, tokens=0: None)


def _in_processes(factory, work, output, todo: list, processes: int):
    """(shard, result) as each finishes, from `processes` spawned processes, each with the worker `factory` (a
    module-level function: it is pickled by name) built once (forking a process that runs polars' thread pool can
    deadlock)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_start, initargs=(factory, work, output)) as pool:
        futures = {pool.submit(_run_one, s): s for s in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()
