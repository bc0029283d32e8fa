"""From config sections to stage configs, once: `curate run`, `curate refresh` and `curate experiment` all chain
score -> prune -> train, and must agree on which model trains on which data."""

from __future__ import annotations

from pathlib import Path

from .config.prune import PruneConfig, PruneOptions
from .config.score import ScoreConfig, ScoreOptions
from .config.train import TrainConfig, TrainOptions

TARGET = "target"  # with prune's target_model: OUT/target holds the kept samples in the target model's tokens


def round_dir(out: Path, r: int) -> Path:
    """A refresh loop's round r (from 1): OUT/round-NN/{scores,pruned,model}."""
    return out / f"round-{r:02d}"


def score_config(options: ScoreOptions, input: str, out: Path, model: str | None = None) -> ScoreConfig:
    """`model` (a later round's checkpoint) replaces the section's own."""
    fields = {k: v for k, v in options.model_dump().items() if k != "input"}
    return ScoreConfig(**{**fields, "model": model or options.model}, input=input, out=str(out))


def written_rows_options(options: ScoreOptions) -> ScoreOptions:
    """Scoring rows q-curate wrote itself (a corrupted copy, as `{id, messages}` JSONL): every row, openai format,
    whatever the section says about the user's own input."""
    return options.model_copy(update={"fields": None, "limit": None, "format": "openai"})


def written_rows_config(options: ScoreOptions, rows: Path, out: Path) -> ScoreConfig:
    return score_config(written_rows_options(options), str(rows), out)


def prune_config(options: PruneOptions, scores: Path, out: Path, **changes) -> PruneConfig:
    return PruneConfig(**{**options.model_dump(), **changes}, scores=str(scores), out=str(out))


def train_config(
    options: TrainOptions,
    prune: PruneOptions | None,
    pruned: Path,
    out: Path,
    scoring_model: str | None,
    continue_from: str | None = None,
    **changes,
) -> TrainConfig:
    """The train stage after a prune. The model: a checkpoint to continue from (a later refresh round), else the
    prune's target model, which then trains on its own tokens (OUT/target), else the train section's model, else
    the scoring model."""
    target = prune.target_model if prune else None
    data = pruned / TARGET if target else pruned
    model = continue_from or target or options.model or scoring_model
    return TrainConfig(**{**options.model_dump(), **changes, "model": model}, data=str(data), out=str(out))
