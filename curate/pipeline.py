"""`curate run PIPELINE.yaml`: the stages a config describes, into one run folder.

Layout: RUN_DIR/config.yaml (resolved), RUN_DIR/scores/, RUN_DIR/pruned/, RUN_DIR/model/ (with a train
section), or RUN_DIR/round-NN/{scores,pruned,model}/ and RUN_DIR/refresh.json (with a refresh section). Each
stage is skipped when its manifest matches its inputs and settings, so rerunning a finished pipeline is a no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from . import io
from .config import Pipeline, TrainSection
from .stages.prune import PruneConfig
from .stages.score import ScoreConfig
from .stages.train import TrainConfig


def resolve_input(value: str) -> str:
    if value == "demo":
        from .demo import demo_data_path

        return str(demo_data_path())
    return value


def stage_configs(p: Pipeline) -> tuple[ScoreConfig, PruneConfig | None, TrainConfig | None]:
    run_dir = Path(p.run_dir)
    score = ScoreConfig(**{**p.score.model_dump(), "input": resolve_input(p.score.input), "out": str(run_dir / "scores")})
    prune = train = None
    if p.prune is not None:
        prune = PruneConfig(**p.prune.model_dump(), scores=str(run_dir / "scores"), out=str(run_dir / "pruned"))
    if p.train is not None or p.refresh is not None:
        train = TrainConfig(**(p.train or TrainSection()).model_dump(), data=str(run_dir / "pruned"),
                            out=str(run_dir / "model"), model=p.score.model)
    return score, prune, train


def run_pipeline(p: Pipeline, stages: dict[str, Callable], force: bool = False, log=lambda msg: None) -> dict:
    """Run the configured stages; `stages` maps score/prune/train to callables taking (config, force)."""
    run_dir = Path(p.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(p.model_dump(), sort_keys=False).encode())
    score_cfg, prune_cfg, train_cfg = stage_configs(p)
    if p.refresh is not None:
        from .stages import refresh

        return {"refresh": refresh.run(run_dir, p.refresh.rounds, score_cfg, prune_cfg, train_cfg,
                                       p.refresh.train_cmd, stages, log=log, force=force)}
    results = {"score": stages["score"](score_cfg, force)}
    if prune_cfg is not None:
        results["prune"] = stages["prune"](prune_cfg, force)
    if train_cfg is not None:
        results["train"] = stages["train"](train_cfg, force)
    return results
