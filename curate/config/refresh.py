"""`curate refresh`'s options (the loop: score, prune, train, rounds) and `curate train-command`'s."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import LocalFolder, Options, PosInt
from .prune import PruneOptions
from .score import ScoreOptions
from .train import TrainOptions


class RefreshOptions(Options):
    rounds: PosInt = Field(
        2, description="Rounds of score -> prune -> train; each scores the FULL input with the latest model."
    )
    train_cmd: str | None = Field(
        None,
        description="Your own training command instead of the built-in trainer; {data} (pruned folder), {model} "
        "(current model) and {out} (where to save the merged model) are filled in.",
    )

    @field_validator("train_cmd")
    @classmethod
    def _has_placeholders(cls, cmd):
        # {model} is optional: a command may name its base model itself.
        missing = [p for p in ("{data}", "{out}") if cmd is not None and p not in cmd]
        if missing:
            raise ValueError(f"the training command must contain {{data}} and {{out}}; missing {', '.join(missing)}")
        return cmd


class TrainCommandConfig(Options):
    command: str = Field(description="The training command; {data}, {model} and {out} are filled in.")
    data: str = Field(description="Pruned data: a `curate prune` folder.")
    model: str = Field(description="The model to start from (a folder or hub id).")
    out: str = Field(description="Where the command must save the trained model (merged, not a bare adapter).")


class RefreshConfig(RefreshOptions):
    input: str = Field(description="SFT data (as for `curate score`).")
    out: LocalFolder = Field(
        description="Run folder: round-NN/{scores,pruned,model}/ and _manifest.json with the summary (local)."
    )
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
