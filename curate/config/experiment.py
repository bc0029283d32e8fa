"""`curate experiment`'s options: the arms, budgets, seeds and the shared score, prune, train and eval sections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from .base import LocalFolder, NonNegInt, Options, Ratio
from .evaluate import EvalOptions
from .prune import PruneOptions
from .score import ScoreOptions
from .train import TrainOptions


def _known_arm(v: str) -> str:
    from ..arms import arm_names

    if v not in arm_names():
        raise ValueError(f"no arm named {v!r} (arms: {', '.join(arm_names())})")
    return v


# An arm: one of the experiment's fixed rules (curate.arms: ARMS, DYNAMIC_ARMS, REFRESH_ARMS) or any registered sample
# strategy.
Arm = Annotated[str, AfterValidator(_known_arm)]
ALL_ARMS = ["full", "random", "qtuning", "qtuning-samples", "ppl-high", "ppl-low", "entropy-high", "entropy-low"]


class Budget(Options):
    ratio: Ratio = Field(description="Fraction of samples kept.")
    token_ratio: Ratio = Field(description="Fraction of tokens kept in the samples whose tokens are pruned.")
    arms: list[Arm] = Field(default_factory=lambda: list(ALL_ARMS), description="Arms trained at this budget.")


class RobustnessOptions(Options):
    fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of training rows corrupted (given another row's answer)."
    )
    seed: NonNegInt = Field(1234, description="Which rows are corrupted, and with whose answers.")
    ratio: Ratio = Field(0.25, description="Sample budget of the robustness arms.")
    token_ratio: Ratio = Field(0.5, description="Token budget of the robustness arms.")
    train_arms: list[Arm] = Field(
        default_factory=lambda: ["full", "random", "qtuning"],
        description="Arms also trained and evaluated on the corrupted set.",
    )


class ExperimentConfig(Options):
    run_dir: LocalFolder = Field(description="Folder of the experiment: scores, one folder per arm, results.")
    train_data: str = Field(description="The training set (any input format).")
    score: ScoreOptions = Field(default_factory=ScoreOptions, description="Scoring (model, fields, limit, ...).")
    prune: PruneOptions = Field(
        default_factory=PruneOptions,
        description="Prune settings shared by every arm (each arm sets its own strategy and budget).",
    )
    train: TrainOptions = Field(default_factory=TrainOptions, description="Identical training settings for every arm.")
    budgets: list[Budget] = Field(
        default_factory=lambda: [Budget(ratio=0.25, token_ratio=0.5), Budget(ratio=0.125, token_ratio=0.5)]
    )
    equal: Literal["epochs", "steps"] = Field(
        "epochs",
        description="epochs: every arm trains train.epochs passes over its own data (a static subset takes fewer "
        "steps); steps: every arm trains as many optimizer steps as full data (train.max_steps, else train.epochs "
        "passes over every training row), the protocol behind the paper's gain (its code selects inside the "
        "trainer, on every step of full data).",
    )
    static_steps: Literal["batch", "epochs"] = Field(
        "batch",
        description="With equal: steps, how a static subset reaches full data's steps: batch (a batch of its kept "
        "share of train.batch_size, the same epochs: the forward compute shrinks with the data) or epochs (the same "
        "batch, more passes over the subset).",
    )
    seeds: list[NonNegInt] = Field(
        default_factory=lambda: [0], description="One training (and random pruning) per seed."
    )
    robustness: RobustnessOptions | None = None
    eval: EvalOptions

    @model_validator(mode="after")
    def _each_arm_trains_as_its_name_says(self):
        # train: is shared by every arm: a selection there would turn full data and the static subsets dynamic too
        if self.train.dynamic or "selection" in self.train.model_fields_set:
            raise ValueError(
                "train.dynamic and train.selection are set by each arm (dynamic-qtuning, dynamic-random and "
                "dynamic-paper select in the trainer with the prune section's rule): remove them from train:"
            )
        if self.equal == "epochs" and self.train.max_steps:
            raise ValueError(
                "train.max_steps with equal: epochs: every arm trains train.epochs passes over its own data; use "
                "equal: steps to train every arm max_steps optimizer steps"
            )
        return self
