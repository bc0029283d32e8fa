"""`curate run PIPELINE.yaml`: the stages a config describes, into one run folder.

Layout: RUN_DIR/config.yaml (resolved), RUN_DIR/scores/, RUN_DIR/pruned/. Each stage is skipped when its
manifest matches its inputs and settings, so rerunning a finished pipeline is a no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from . import io
from .config import Pipeline
from .stages.prune import PruneConfig
from .stages.score import ScoreConfig


def resolve_input(value: str) -> str:
    if value == "demo":
        from .demo import demo_data_path

        return str(demo_data_path())
    return value


def stage_configs(p: Pipeline) -> tuple[ScoreConfig, PruneConfig | None]:
    run_dir = Path(p.run_dir)
    score = ScoreConfig(**{**p.score.model_dump(), "input": resolve_input(p.score.input), "out": str(run_dir / "scores")})
    prune = None
    if p.prune is not None:
        prune = PruneConfig(**p.prune.model_dump(), scores=str(run_dir / "scores"), out=str(run_dir / "pruned"))
    return score, prune


def run_pipeline(p: Pipeline, *, score_fn: Callable, prune_fn: Callable, force: bool = False) -> dict:
    run_dir = Path(p.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(p.model_dump(), sort_keys=False).encode())
    score_cfg, prune_cfg = stage_configs(p)
    results = {"score": score_fn(score_cfg, force)}
    if prune_cfg is not None:
        results["prune"] = prune_fn(prune_cfg, force)
    return results
