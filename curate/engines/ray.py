"""The Ray engine: a sharded stage's shards (`curate.stage.Shards`) on a pool of Ray actors, one worker each (for
`curate score --engine ray`, a scorer), over the GPUs of one machine or many, sized by the stage's `Resources`.

The unit of work is the shard, exactly as in the local engine: a scoring actor reads its shard's input rows,
tokenises them, scores them and writes the shard atomically into `--out`: a folder every node sees (NFS), or a
bucket URL, where it writes into its node's working copy and uploads the shard as one object, then reports what
the driver needs of it (`shard_summary`). The driver only hands the shards the executor left out, draws one
progress bar over all actors, and replaces an actor that dies (its shard is redone, by another actor or by the
replacement); a shard that fails 3 times stops the run with its error.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque

from ..errors import CurateError
from ..progress import Reporter
from ..stage import Resources
from ..storage import OPTIONS_ENV
from . import ShardProgress, ShardTask

MAX_ATTEMPTS = 3  # a shard that fails this many times stops the run
LOCAL_OBJECT_STORE = 200 * 1024**2  # we pass configs and summaries, never data, through the object store


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ShardActor:
        """One worker of a sharded stage (a scorer: tokenizer and model) in its own process, on its own GPU(s)."""

        def __init__(self, factory, work, output, gpus, progress):
            self.worker = factory(work, output, gpus)
            self.progress = progress
            self.tokens, self.seconds = 0, 0.0

        def open(self) -> tuple:
            """(what the worker says once loaded, this worker's pid): the pid is logged, so that an operator or a test
            can act on this run's workers only."""
            return self.worker.open(), os.getpid()

        def run(self, shard) -> dict:
            def progress(units: int, tokens: int = 0) -> None:
                self.progress.put_nowait((shard.index, units, tokens))

            result = self.worker.run(shard, progress)
            self.tokens += result.get("tokens", 0)
            self.seconds += result.get("seconds", 0.0)
            # the pid travels with the result: asking the actor afterwards fails if it died just after this shard
            return {**result, "pid": os.getpid(), "worker_tokens_per_s": self.tokens / max(self.seconds, 1e-9)}

    return ShardActor


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


def pool_size(resources: Resources, cluster: dict) -> tuple[int, float, float]:
    """(actors, GPUs and CPUs per actor): as many as asked, else one actor per GPU of the cluster (or per
    `gpus_per_worker` GPUs), 1 actor without GPUs."""
    gpus = cluster.get("GPU", 0)
    per = resources.gpus_per_worker if resources.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    n = resources.workers or (max(1, int(gpus // per)) if per else 1)
    return n, per, resources.cpus_per_worker


def _cause(error) -> BaseException:
    return getattr(error, "cause", None) or error


def run(task: ShardTask, reporter: Reporter) -> tuple[dict, dict]:
    """({index: result} of the shards in `task.todo`, the engine's info): a pool of actors, each with one worker."""
    import ray
    from ray.util.queue import Queue

    label, todo = task.label, task.todo
    connected = _connect(task.resources.address, reporter)
    n_workers, gpus, cpus = pool_size(task.resources, ray.cluster_resources())
    bar = ShardProgress(task, reporter)
    progress = Queue()
    # storage options travel to every node by the environment (never through a config or a manifest)
    env = {k: os.environ[k] for k in (OPTIONS_ENV,) if k in os.environ}
    actor_class = _actor_class().options(
        num_cpus=cpus, num_gpus=gpus, **({"runtime_env": {"env_vars": env}} if env else {})
    )

    def start():
        return actor_class.remote(task.shards.worker, task.work, task.output, gpus, progress)

    actors: list = []
    try:
        actors = [start() for _ in range(min(n_workers, max(1, len(todo))))] if todo else []
        _open(actors, label, reporter)
        reporter.log(f"ray: {len(actors)} {label} worker(s), {gpus:g} GPU(s) and {cpus:g} CPU(s) each")
        summary = _dispatch(start, todo, actors, progress, bar, label, reporter)
    finally:
        for a in actors:
            ray.kill(a)
        reporter.finish()
        if connected:
            ray.shutdown()
    info = {
        "engine": "ray",
        "workers": len(actors),
        "gpus_per_worker": gpus,
        "seconds": round(summary["wall_seconds"], 3),
        "worker_tokens_per_s": [round(v, 1) for v in summary["per_worker"].values()],
        "replaced_workers": summary["replaced"],
    }
    return summary["results"], info


def _open(actors, label: str, reporter: Reporter) -> None:
    """Start each actor's worker (its pid logged); a model that cannot load stops the run here."""
    import ray

    try:
        opened = ray.get([a.open.remote() for a in actors])
        if opened:
            reporter.log(f"ray: {label} worker pid(s) {', '.join(str(pid) for _, pid in opened)}")
    except ray.exceptions.RayError as e:
        cause = _cause(e)
        if isinstance(cause, CurateError):
            raise CurateError(str(cause)) from None
        raise CurateError(f"a Ray worker could not start: {cause}") from None


def _dispatch(start, todo, actors, progress, bar: ShardProgress, label: str, reporter: Reporter) -> dict:
    """Hand shards to idle actors until all are done; replace dead actors (appended to `actors`); retry failed
    shards."""
    import ray

    pending, idle, running = deque(todo), list(actors), {}
    failures: Counter = Counter()
    replaced, per_worker, t0 = 0, {}, time.time()
    results: dict[int, dict] = {}
    while pending or running:
        while pending and idle:
            actor, shard = idle.pop(), pending.popleft()
            running[actor.run.remote(shard)] = (actor, shard)
            bar.partial[shard.index] = [0, 0]
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
        for index, n_units, n_tokens in progress.get_nowait_batch(progress.qsize()):
            if index in bar.partial:  # not from an attempt that failed since
                bar.add(index, n_units, n_tokens, show=False)
        for ref in ready:
            actor, shard = running.pop(ref)
            bar.partial.pop(shard.index, None)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the process or its node died: replace it, redo the shard
                failures[shard.index] += 1
                _give_up_after(failures[shard.index], shard, f"its worker died ({_cause(e)})")
                reporter.log(f"warning: a Ray worker died on shard {shard.index}; starting another and redoing it")
                ray.kill(actor)
                actor = start()
                actors.append(actor)  # so that it is stopped at the end, as the others
                _open([actor], label, reporter)
                replaced += 1
                pending.appendleft(shard)
            except ray.exceptions.RayTaskError as e:
                cause = _cause(e)
                if isinstance(cause, CurateError):  # a user-facing error (e.g. --on-bad-row fail): as it is
                    raise CurateError(str(cause)) from None
                failures[shard.index] += 1
                _give_up_after(failures[shard.index], shard, f"{type(cause).__name__}: {cause}")
                pending.appendleft(shard)
            else:
                bar.finished(shard.index, result)
                results[shard.index] = result
                per_worker[result["pid"]] = result["worker_tokens_per_s"]
            idle.append(actor)
        bar.show()
    return {"wall_seconds": time.time() - t0, "per_worker": per_worker, "replaced": replaced, "results": results}


def _give_up_after(attempts: int, shard, error: str) -> None:
    if attempts >= MAX_ATTEMPTS:
        where = f" (input rows {shard.start}-{shard.stop - 1})" if hasattr(shard, "start") else ""
        raise CurateError(f"shard {shard.index}{where} failed {attempts} times; last error: {error}")
