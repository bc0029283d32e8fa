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
