"""`curate probe`'s options: how rows are corrupted, the budget, the seeds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import NonNegInt, Options, PosInt, Ratio
from .prune import PruneOptions
from .score import ScoreOptions


class ProbeOptions(Options):
    fraction: float = Field(0.2, gt=0, lt=1, description="Share of the rows corrupted (at least 2 rows).")
    corruptions: list[Literal["answer", "reply", "arguments"]] = Field(
        default_factory=lambda: ["answer", "reply", "arguments"],
        description="How rows are broken, comma-separated (each row by one that applies to it): answer (a single-turn "
        "row gets another row's answer), reply (a multi-turn row's last free-text reply becomes another "
        "conversation's), arguments (the numbers in a tool call's arguments are changed).",
    )
    ratio: Ratio = Field(0.25, description="Sample budget of every strategy, as `curate prune --ratio`.")
    seeds: list[NonNegInt] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Corruption seeds, comma-separated: each corrupts other rows (scored once per seed); the table "
        "shows the mean and sd over them. Each is also the seed of the strategies.",
    )
    random_seeds: PosInt = Field(20, description="Draws of the random strategy per seed; the table shows their mean.")

    @field_validator("corruptions", mode="before")
    @classmethod
    def _parse_corruptions(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _parse_seeds(cls, v: Any) -> Any:
        if isinstance(v, str):  # `--seeds 0,1,2`
            return [int(p) if p.strip().isdigit() else p for p in v.split(",") if p.strip()]
        return v


class ProbeConfig(ProbeOptions):
    input: str = Field(description="The data set to probe (any input format `curate score` reads).")
    out: str = Field(description="Folder: corrupted.jsonl, corrupted.json, scores/, probe.json and probe.md.")
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)
