"""Engines run a sharded stage's shards, behind one protocol: an engine is a function `run(task, reporter) ->
({index: result}, info)`, given the shards left to do, the stage's workers and the `Resources` it asked for, never
its config (as NeMo Curator's executors run any stage from its declaration, `nemo_curator/backends/base.py`). Three:
in this process (one stateful worker: a loaded model), in local processes (stateless workers: prune's masks) and on
Ray actors. They sit below the stages: an engine imports no stage and no stage's config; `ShardProgress` is their
one progress bar."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..progress import Reporter
from ..stage import Resources, Shards


@dataclass(frozen=True)
class ShardTask:
    """What an engine is given: the declaration (workers, sizes), what every worker needs, where shards are written,
    every shard of the run and those left to do, and the resources to run them on."""

    label: str
    shards: Shards
    work: Any
    output: Any  # the executor's ShardOutput
    planned: list
    todo: list
    resources: Resources

    def worker(self, gpus: float = 0):
        return self.shards.worker(self.work, self.output, gpus)


Engine = Callable[[ShardTask, Reporter], tuple[dict, dict]]


def pick(task: ShardTask) -> Engine:
    """The engine for the task's resources (imported only when used: Ray only where it is asked for); local
    processes only where more than one would work."""
    if task.resources.engine == "ray":
        name = "ray"
    elif min(task.resources.workers or 1, len(task.todo)) > 1:
        name = "processes"
    else:
        name = "local"
    return importlib.import_module(f"{__name__}.{name}").run


class ShardProgress:
    """One progress bar over a run's shards: those finished before counted from the start, each shard in flight by
    what it reports, and a finished shard by its whole size and the tokens its result counts."""

    def __init__(self, task: ShardTask, reporter: Reporter):
        self.reporter = reporter
        self.sizes = {s.index: task.shards.size(s) for s in task.planned}
        left = {s.index for s in task.todo}
        self.done = [sum(n for i, n in self.sizes.items() if i not in left), 0]  # units, tokens
        self.partial: dict[int, list[int]] = {}  # of the shards in flight
        reporter.start(task.label, sum(self.sizes.values()), task.shards.unit)
        self.show()

    def add(self, index: int, units: int, tokens: int = 0, show: bool = True) -> None:
        part = self.partial.setdefault(index, [0, 0])
        part[0] += units
        part[1] += tokens
        if show:
            self.show()

    def for_shard(self, shard) -> Callable[..., None]:
        """The `progress(units, tokens)` callback a worker is given for `shard`."""
        return lambda units, tokens=0: self.add(shard.index, units, tokens)

    def finished(self, index: int, result: dict) -> None:
        self.partial.pop(index, None)
        self.done[0] += self.sizes[index]
        self.done[1] += result.get("tokens", 0)
        self.show()

    def show(self) -> None:
        units = self.done[0] + sum(p[0] for p in self.partial.values())
        tokens = self.done[1] + sum(p[1] for p in self.partial.values())
        self.reporter.advance(units, tokens)
