"""`curate run`'s options: a pipeline, as sections (score, prune, train, refresh) or as `steps:` of any stages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import LocalFolder, Options, load_model
from .prune import PruneOptions
from .refresh import RefreshOptions
from .score import ScoreSection
from .train import TrainOptions

STEP_NAME = "name"  # beside a step's stage, the folder it writes: {prune: {ratio: 0.25}, name: quarter}
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def step_parts(step: dict) -> tuple[str, dict, str | None]:
    """(stage, options, the name given) of one of a pipeline's `steps`."""
    ((stage, options),) = [(key, value) for key, value in step.items() if key != STEP_NAME]
    return stage, options, step.get(STEP_NAME)


class Pipeline(Options):
    run_dir: LocalFolder = Field(description="The run folder: one folder per stage inside it.")
    score: ScoreSection | None = None
    prune: PruneOptions | None = None
    train: TrainOptions | None = None  # without refresh: train once on the pruned data into RUN_DIR/model
    refresh: RefreshOptions | None = None  # the loop: RUN_DIR/round-NN/{scores,pruned,model}
    # Or any registered stages, in order: [{STAGE: {options}, name: FOLDER}, ...] (name optional); each one's
    # inputs are the latest outputs of the kinds it asks for (a stage producing scores between score and prune is
    # pruned from), its folder its own (`curate.stages.run.step_folder`).
    steps: list[dict[str, Any]] | None = None

    @field_validator("steps")
    @classmethod
    def _one_stage_each(cls, steps: list[dict] | None) -> list[dict] | None:
        for i, step in enumerate(steps or []):
            stages = [key for key in step if key != STEP_NAME]
            if len(stages) != 1 or not isinstance(step[stages[0]], dict):
                raise ValueError(f"steps[{i}]: a step is {{STAGE: {{options}}}}, one stage each (and name: FOLDER)")
            name = step.get(STEP_NAME)
            if name is not None and not (isinstance(name, str) and FOLDER_NAME.fullmatch(name)):
                raise ValueError(f"steps[{i}]: name {name!r} is not a plain folder name (letters, digits, . _ -)")
        return steps

    @model_validator(mode="after")
    def _stages_fit_together(self):
        if self.steps is not None:
            if any(getattr(self, s) is not None for s in ("score", "prune", "train", "refresh")):
                raise ValueError("give either steps or the score/prune/train/refresh sections, not both")
            if not self.steps:
                raise ValueError("steps lists no stage")
            return self
        if self.score is None:
            raise ValueError("a pipeline needs a score section (or steps)")
        if (self.train or self.refresh) and self.prune is None:
            raise ValueError("train and refresh need a prune section (they train on the pruned data)")
        return self


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    return load_model("run", path, overrides, "pipeline config")
