"""`curate score --engine ray`: a pool of Ray actors, one scorer each, over the GPUs of one machine or many.

The unit of work is the shard, exactly as in the local engine: an actor reads its shard's input rows,
tokenises them, scores them and writes the shard atomically into `--out`: a folder every node sees (NFS), or a
bucket URL, where it writes into its node's working copy and uploads the shard as one object, then reports what
the driver needs of it (`shard_summary`). The driver only plans the shards, hands them out, draws one progress
bar over all actors, and replaces an actor that dies (its shard is redone, by another actor or by the
replacement); a shard that fails 3 times stops the run with its error.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path

from ..errors import CurateError
from ..progress import Reporter
from ..storage import OPTIONS_ENV

MAX_ATTEMPTS = 3  # a shard that fails this many times stops the run
LOCAL_OBJECT_STORE = 200 * 1024**2  # we pass configs and summaries, never data, through the object store


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ScoreActor:
        """One ShardWorker (tokenizer + scorer) in its own process, on its own GPU(s)."""

        def __init__(self, job, progress):
            from ..models import BUILTIN_LABEL, ensure_builtin, model_on_this_node
            from .shard import ShardWorker

            if job.model_name == BUILTIN_LABEL and not Path(job.model_path).exists():
                # the built-in model lives in each node's cache; convert it here if this node has none yet
                job = replace(job, model_path=str(ensure_builtin()))
            elif job.cfg.model:  # a model given as a URL: fetched into this node's cache, checked by its hash
                job = replace(job, model_path=model_on_this_node(job.cfg.model, job.model_path, job.model_hash))
            self.worker = ShardWorker(job)
            self.progress = progress
            self.tokens, self.seconds = 0, 0.0

        def open(self) -> tuple[str, int]:
            """The entropy method once the model is loaded, and this worker's pid (logged, so that an operator or a
            test can act on this run's workers only)."""
            return self.worker.open(), os.getpid()

        def run(self, rows) -> dict:
            def on_batch(n_rows: int, n_tokens: int) -> None:
                self.progress.put_nowait((rows.index, n_rows, n_tokens))

            result = self.worker.run(rows, on_batch)
            self.tokens += result["tokens"]
            self.seconds += result["seconds"]
            # the pid travels with the result: asking the actor afterwards fails if it died just after this shard
            return {**result, "pid": os.getpid(), "worker_tokens_per_s": self.tokens / max(self.seconds, 1e-9)}

    return ScoreActor


def _connect(address: str | None, reporter: Reporter) -> bool:
    """Join the cluster (or start a local one); returns whether this call connected, and so must disconnect
    (ray.shutdown stops a local cluster we started and only detaches from one we joined)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE)
    res = ray.cluster_resources()
    reporter.log(f"ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
    return True


def pool_size(cfg, resources: dict) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU (or per --gpus-per-worker GPUs), 1 actor without GPUs."""
    gpus = resources.get("GPU", 0)
    per = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    n = cfg.num_workers or (max(1, int(gpus // per)) if per else 1)
    return n, per


def _cause(error) -> BaseException:
    return getattr(error, "cause", None) or error


def score_on_ray(job, todo, done, ranges, reporter: Reporter) -> dict:
    import ray
    from ray.util.queue import Queue

    from .shard import refuse_mixed_methods

    cfg = job.cfg
    connected = _connect(cfg.address, reporter)
    n_workers, gpus = pool_size(cfg, ray.cluster_resources())
    if cfg.backend == "vllm" and gpus > 1:
        job = replace(job, cfg=cfg.model_copy(update={"tensor_parallel_size": int(gpus)}))  # TP inside the actor
    sizes = {r.index: r.stop - r.start for r in ranges}
    rows_done = sum(sizes[i] for i in done)
    reporter.start("score", sum(sizes.values()))
    reporter.advance(rows_done, 0)
    progress = Queue()
    # storage options travel to every node by the environment (never through a config or a manifest)
    env = {k: os.environ[k] for k in (OPTIONS_ENV,) if k in os.environ}
    actor_class = _actor_class().options(
        num_cpus=cfg.cpus_per_worker, num_gpus=gpus, **({"runtime_env": {"env_vars": env}} if env else {})
    )
    actors: list = []
    try:
        actors = [actor_class.remote(job, progress) for _ in range(min(n_workers, max(1, len(todo))))] if todo else []
        methods = _open(actors, reporter)
        if methods:
            refuse_mixed_methods(job.out(), done, methods[0])
        reporter.log(f"ray: {len(actors)} scorer actor(s), {gpus:g} GPU(s) and {cfg.cpus_per_worker:g} CPU(s) each")
        summary = _dispatch(job, todo, actors, actor_class, progress, rows_done, sizes, reporter)
    finally:
        for a in actors:
            ray.kill(a)
        reporter.finish()
        if connected:
            ray.shutdown()
    seconds = max(summary["wall_seconds"], 1e-9)
    return {
        "engine": "ray",
        "workers": len(actors),
        "gpus_per_worker": gpus,
        "tokens_scored_this_run": summary["tokens"],
        "seconds": round(summary["wall_seconds"], 3),
        "tokens_per_s": round(summary["tokens"] / seconds, 1) if summary["tokens"] else None,
        "worker_tokens_per_s": [round(v, 1) for v in summary["per_worker"].values()],
        "replaced_workers": summary["replaced"],
        "shard_summaries": summary["summaries"],  # not for the manifest: the stage takes it out
    }


def _open(actors, reporter: Reporter) -> list[str]:
    """Each actor's entropy method once its model is loaded (its pid logged); a model that cannot load stops the
    run here."""
    import ray

    try:
        opened = ray.get([a.open.remote() for a in actors])
        if opened:
            reporter.log(f"ray: scorer worker pid(s) {', '.join(str(pid) for _, pid in opened)}")
        return [method for method, _ in opened]
    except ray.exceptions.RayError as e:
        cause = _cause(e)
        if isinstance(cause, CurateError):
            raise CurateError(str(cause)) from None
        raise CurateError(f"a Ray worker could not start its scorer: {cause}") from None


def _dispatch(job, todo, actors, actor_class, progress, rows_done, sizes, reporter: Reporter) -> dict:
    """Hand shards to idle actors until all are written; replace dead actors (appended to `actors`); retry
    failed shards."""
    import ray

    pending, idle, running = deque(todo), list(actors), {}
    failures: Counter = Counter()
    partial: dict[int, list[int]] = {}  # rows and tokens of the shards in flight
    tokens, replaced, per_worker, t0 = 0, 0, {}, time.time()
    summaries: dict[int, dict] = {}  # shard -> what its worker read of it (an OUT at a URL: maybe on another node)
    while pending or running:
        while pending and idle:
            actor, rows = idle.pop(), pending.popleft()
            running[actor.run.remote(rows)] = (actor, rows)
            partial[rows.index] = [0, 0]
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
        for index, n_rows, n_tokens in progress.get_nowait_batch(progress.qsize()):
            if index in partial:
                partial[index][0] += n_rows
                partial[index][1] += n_tokens
        for ref in ready:
            actor, rows = running.pop(ref)
            partial.pop(rows.index, None)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the process or its node died: replace it, redo the shard
                failures[rows.index] += 1
                _give_up_after(failures[rows.index], rows, f"its worker died ({_cause(e)})")
                reporter.log(f"warning: a Ray worker died on shard {rows.index}; starting another and redoing it")
                ray.kill(actor)
                actor = actor_class.remote(job, progress)
                actors.append(actor)  # so that it is stopped at the end, as the others
                _open([actor], reporter)
                replaced += 1
                pending.appendleft(rows)
            except ray.exceptions.RayTaskError as e:
                cause = _cause(e)
                if isinstance(cause, CurateError):  # a user-facing error (e.g. --on-bad-row fail): as it is
                    raise CurateError(str(cause)) from None
                failures[rows.index] += 1
                _give_up_after(failures[rows.index], rows, f"{type(cause).__name__}: {cause}")
                pending.appendleft(rows)
            else:
                rows_done += sizes[rows.index]
                tokens += result["tokens"]
                if "summary" in result:
                    summaries[rows.index] = result["summary"]
                per_worker[result["pid"]] = result["worker_tokens_per_s"]
            idle.append(actor)
        reporter.advance(rows_done + sum(p[0] for p in partial.values()), tokens + sum(p[1] for p in partial.values()))
    return {
        "tokens": tokens,
        "wall_seconds": time.time() - t0,
        "per_worker": per_worker,
        "replaced": replaced,
        "summaries": summaries,
    }


def run_tasks(fn, args: list, address: str | None, reporter: Reporter) -> list:
    """fn(arg) for every arg as Ray tasks (one CPU each), results in order: `curate prune --engine ray` pass 2."""
    import ray

    connected = _connect(address, reporter)
    try:
        remote = ray.remote(num_cpus=1, max_retries=MAX_ATTEMPTS - 1)(fn)
        return ray.get([remote.remote(a) for a in args])
    except ray.exceptions.RayError as e:
        raise CurateError(f"a Ray task failed {MAX_ATTEMPTS} times: {_cause(e)}") from None
    finally:
        if connected:
            ray.shutdown()


def _give_up_after(attempts: int, rows, error: str) -> None:
    if attempts >= MAX_ATTEMPTS:
        raise CurateError(
            f"shard {rows.index} (input rows {rows.start}-{rows.stop - 1}) failed {attempts} times; last error: {error}"
        )
