"""Every stage, by name: each stage module registers its declaration when it is imported, and the built-in
stages are every module of `curate.stages`, so adding one edits no table."""

from __future__ import annotations

import importlib
import pkgutil

from .errors import CurateError
from .stage import Stage

REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    REGISTRY[stage.name] = stage
    return stage


def all_stages() -> dict[str, Stage]:
    """Every registered stage; the built-in ones are every module of `curate.stages`."""
    from . import stages

    for module in pkgutil.iter_modules(stages.__path__):
        importlib.import_module(f"{stages.__name__}.{module.name}")
    return REGISTRY


def get(name: str) -> Stage:
    found = all_stages().get(name)
    if found is None:
        raise CurateError(f"no stage named {name!r} (stages: {', '.join(sorted(REGISTRY))})")
    return found


def reads(stage: Stage) -> set[str]:
    """The kinds of output a stage reads: its inputs' kinds, and the kinds its command says it follows."""
    kinds = set(stage.cli.follows)
    for spec in stage.inputs:
        kinds |= {spec.kind} if isinstance(spec.kind, str) else set(spec.kind or ())
    return kinds


def in_order() -> list[Stage]:
    """The stages in the order data flows through them, for `curate --help`: each after the stages whose output it
    reads (by kind; ties by name), a stage that runs a pipeline of others and reads no input of its own (`run`)
    before them all, and one that runs others over its input (a loop, a study) after them. Nothing is numbered: a new
    stage finds its place from what it reads."""
    stages = all_stages()
    depth: dict[str, int] = {}

    def depth_of(stage: Stage, seen: frozenset = frozenset()) -> int:
        if stage.name not in depth:
            producers = [
                s for s in stages.values() if s.kind in reads(stage) and s.name != stage.name and s.name not in seen
            ]
            depth[stage.name] = 1 + max((depth_of(p, seen | {stage.name}) for p in producers), default=-1)
        return depth[stage.name]

    def place(stage: Stage) -> tuple:
        group = 1 if not stage.walks else 0 if not stage.inputs else 2
        return group, depth_of(stage), stage.name

    return sorted(stages.values(), key=place)
