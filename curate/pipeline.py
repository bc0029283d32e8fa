"""`curate run PIPELINE.yaml`: the stages a config describes, into one run folder.

Layout: RUN_DIR/config.yaml (resolved), RUN_DIR/scores/, RUN_DIR/pruned/, RUN_DIR/model/ (with a train
section), or RUN_DIR/round-NN/{scores,pruned,model}/ (with a refresh section). Each stage is skipped when its
manifest matches its inputs and settings, so rerunning a finished pipeline is a no-op.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from . import io, wiring
from .config import Pipeline, PruneConfig, RefreshConfig, ScoreConfig, TrainConfig, TrainOptions
from .errors import StaleOutputError
from .executor import require_stage, run_stage
from .progress import Reporter


def resolve_input(value: str) -> str:
    if value == "demo":
        from .demo import demo_data_path

        return str(demo_data_path())
    return value


def stage_configs(p: Pipeline) -> tuple[ScoreConfig, PruneConfig | None, TrainConfig | None]:
    run_dir = Path(p.run_dir)
    score = wiring.score_config(p.score, resolve_input(p.score.input), run_dir / "scores")
    prune = train = None
    if p.prune is not None:
        prune = wiring.prune_config(p.prune, run_dir / "scores", run_dir / "pruned")
    if p.train is not None or p.refresh is not None:
        options = p.train or TrainOptions()
        train = wiring.train_config(options, p.prune, run_dir / "pruned", run_dir / "model", p.score.model)
    return score, prune, train


def refresh_config(p: Pipeline) -> RefreshConfig:
    score = p.score.model_dump(exclude={"input"})
    return RefreshConfig(
        **p.refresh.model_dump(),
        input=resolve_input(p.score.input),
        out=p.run_dir,
        score=score,
        prune=p.prune.model_dump(),
        train=(p.train or TrainOptions()).model_dump(),
    )


def pipeline_stages(p: Pipeline) -> list[tuple[str, object]]:
    """(stage, config) of every stage the pipeline runs, for checking what they need before any work."""
    score_cfg, prune_cfg, train_cfg = stage_configs(p)
    stages = [("score", score_cfg)] + ([("prune", prune_cfg)] if prune_cfg else [])
    if train_cfg and not (p.refresh and p.refresh.train_cmd):
        stages.append(("train", train_cfg))
    return stages


def run_pipeline(p: Pipeline, reporter: Reporter | None = None, force: bool = False) -> dict:
    """Run the configured stages; returns each stage's result by stage name."""
    reporter = reporter or Reporter()
    run_dir = Path(p.run_dir)
    for name, cfg in pipeline_stages(p):
        require_stage(name, cfg)
    with io.locked(run_dir, reporter.log):
        io.write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(p.model_dump(), sort_keys=False).encode())
        if p.refresh is not None:
            return {"refresh": run_stage("refresh", refresh_config(p), reporter, force)}
        return {name: run_stage(name, cfg, reporter, force) for name, cfg in pipeline_stages(p)}


def run_demo(out_dir: Path, reporter, force: bool = False, pipeline=None) -> dict:
    """Run the demo pipeline. A demo folder left by other settings or an older q-curate is recomputed (a minute
    on CPU), where `curate run` refuses to replace scores."""
    from .demo import demo_pipeline

    pipeline = pipeline or demo_pipeline(out_dir)
    try:
        return run_pipeline(pipeline, reporter, force)
    except StaleOutputError:
        reporter.log(f"{out_dir} holds a demo run from other settings or an older q-curate; recomputing it")
        return run_pipeline(pipeline, reporter, True)
