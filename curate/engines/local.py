"""The in-process engine: a sharded stage's shards, one after another, on one worker in this process (a stateful
worker: a loaded model, which may work ahead through `stream`)."""

from __future__ import annotations

from ..progress import Reporter
from . import ShardProgress, ShardTask


def run(task: ShardTask, reporter: Reporter) -> tuple[dict, dict]:
    """({index: result} of the shards in `task.todo`, the engine's info)."""
    progress = ShardProgress(task, reporter)
    results, info = {}, {}
    try:
        if task.todo:
            worker = task.worker()
            try:
                for shard, result in worker.stream(task.todo, progress.for_shard):
                    results[shard.index] = result
                    progress.finished(shard.index, result)
                info = worker.info()
            finally:
                worker.close()
    finally:
        reporter.finish()
    return results, {"engine": "local", "workers": 1, **info}
