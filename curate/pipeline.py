"""`curate run PIPELINE.yaml`: the stages a config describes, into one run folder.

Layout: RUN_DIR/config.yaml (resolved), RUN_DIR/scores/, RUN_DIR/pruned/, RUN_DIR/model/ (with a train
section), or RUN_DIR/round-NN/{scores,pruned,model}/ (with a refresh section). Each stage is skipped when its
manifest matches its inputs and settings, so rerunning a finished pipeline is a no-op.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from . import io
from .config import Pipeline, PruneConfig, RefreshConfig, ScoreConfig, TrainConfig, TrainOptions
from .extras import require_stages
from .progress import Reporter
from .stages.prune import TARGET


def resolve_input(value: str) -> str:
    if value == "demo":
        from .demo import demo_data_path

        return str(demo_data_path())
    return value


def stage_configs(p: Pipeline) -> tuple[ScoreConfig, PruneConfig | None, TrainConfig | None]:
    run_dir = Path(p.run_dir)
    score = ScoreConfig(**{**p.score.model_dump(), "input": resolve_input(p.score.input)}, out=str(run_dir / "scores"))
    prune = train = None
    if p.prune is not None:
        prune = PruneConfig(**p.prune.model_dump(), scores=str(run_dir / "scores"), out=str(run_dir / "pruned"))
    if p.train is not None or p.refresh is not None:
        options = (p.train or TrainOptions()).model_dump()
        target = p.prune.target_model if p.prune else None  # then the target model trains on its own tokens
        data = run_dir / "pruned" / TARGET if target else run_dir / "pruned"
        model = options["model"] or target or p.score.model
        train = TrainConfig(**{**options, "model": model}, data=str(data), out=str(run_dir / "model"))
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


def run_pipeline(p: Pipeline, reporter: Reporter | None = None, force: bool = False) -> dict[str, dict]:
    """Run the configured stages; returns each stage's manifest by stage name."""
    from .stages import prune, refresh, score, train

    reporter = reporter or Reporter()
    run_dir = Path(p.run_dir)
    require_stages(*pipeline_stages(p))
    with io.locked(run_dir, reporter.log):
        io.write_bytes_atomic(run_dir / "config.yaml", yaml.safe_dump(p.model_dump(), sort_keys=False).encode())
        if p.refresh is not None:
            return {"refresh": refresh.run(refresh_config(p), reporter, force)}
        score_cfg, prune_cfg, train_cfg = stage_configs(p)
        results = {"score": score.run(score_cfg, reporter, force)}
        if prune_cfg is not None:
            results["prune"] = prune.run(prune_cfg, reporter, force)
        if train_cfg is not None:
            results["train"] = train.run(train_cfg, reporter, force)
        return results
