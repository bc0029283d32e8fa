"""`curate prune`'s options: the selection (`curate.config.selection`), its scope, groups and where it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import KEYED_FIELDS, RUNTIME, Engine, NonNegInt, PosInt, Ratio, RayAddress
from .selection import SelectionOptions


def parse_group_ratios(v: Any) -> Any:
    """`source=math:0.2,chat:0.1` (CLI) or {math: 0.2, chat: 0.1} (YAML) -> {"math": 0.2, "chat": 0.1}."""
    if not isinstance(v, str):
        return v
    spec = v.split("=", 1)[1] if "=" in v.split(":", 1)[0] else v
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition(":")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"cannot read {part!r}; expected GROUP:RATIO, e.g. math:0.2,chat:0.1") from None
        if not sep or not name:
            raise ValueError(f"cannot read {part!r}; expected GROUP:RATIO, e.g. math:0.2,chat:0.1")
    return out


class PruneOptions(SelectionOptions):
    scope: Literal["global", "batch"] = Field(
        "global",
        description="global: quantiles over the whole dataset; batch: per shuffled batch (as the paper, in training).",
    )
    batch_size: PosInt = Field(8, description="Batch size for --scope batch.")
    seed: NonNegInt = Field(0, description="Seed for batch shuffling and the random strategies.")
    keep_duplicates: bool = Field(
        False,
        description="Keep identical conversations as separate samples; by default only the first copy (by id) "
        "takes part and the others are counted as dropped duplicates.",
    )
    exclude_ids: str | None = Field(
        None,
        description="A text file of sample ids, one per line exactly as written, spaces included (as the explorer "
        "downloads a selection; # comments allowed), to leave out of the triage: never kept, listed as excluded in "
        "samples.parquet; the budget counts the others.",
    )
    allow_changed_input: bool = Field(
        False,
        description="Prune even though the scored input file changed after scoring (refused by default: the "
        "scores describe the old rows; score again instead).",
        json_schema_extra=RUNTIME,
    )
    group_by: str | None = Field(
        None,
        description="A column carried from the input (score --keep-fields): triage and exact budget within each group.",
    )
    group_ratios: dict[str, Ratio] = Field(
        default_factory=dict,
        description="Ratios per group with --group-by, e.g. source=math:0.2,chat:0.1 (others: --ratio).",
    )
    target_model: str | None = Field(
        None,
        description="Also carry the kept samples over to this model's tokenizer and chat template (into "
        "OUT/target, as `curate retokenize`), to train a model of another family than the scorer.",
        json_schema_extra=RUNTIME,
    )
    report: bool = Field(
        False, description="Also write the EU-plane report into OUT/report.", json_schema_extra=RUNTIME
    )
    workers: PosInt = Field(
        1,
        description="Processes writing the masks (pass 2) in parallel; the output is identical.",
        json_schema_extra=RUNTIME,
    )
    engine: Engine = "local"
    address: RayAddress = None

    @field_validator("group_ratios", mode="before")
    @classmethod
    def _parse_group_ratios(cls, v: Any) -> Any:
        return parse_group_ratios(v)

    @model_validator(mode="after")
    def _ratios_need_groups(self):
        if self.group_ratios and not self.group_by:
            raise ValueError("group_ratios needs group_by")
        return self


KEYED_FIELDS.add("group_ratios")


class PruneConfig(PruneOptions):
    scores: str = Field(description="Scores folder written by `curate score`.")
    out: str = Field(description="Folder for the pruned dataset (data/train-*.parquet, samples.parquet, stats.json).")
