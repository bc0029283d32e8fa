"""`curate evaluate`'s options (and the experiment's `eval` section)."""

from __future__ import annotations

from pydantic import Field

from .base import Device, FieldNames, NonNegInt, Options, PosInt


class EvalOptions(Options):
    data: str = Field(description="Held-out question/answer rows (e.g. GSM8K test.jsonl).")
    fields: FieldNames = None
    skip: NonNegInt = Field(
        0, description="Skip the first N usable rows: hold out the end of the training file (train on score.limit)."
    )
    limit: PosInt | None = Field(None, description="Rows for the answer NLL (default: all).")
    em_limit: int | None = Field(None, ge=0, description="Rows for GSM8K exact match (default: limit; 0: none).")
    max_new_tokens: PosInt = Field(320, description="Longest generated answer.")
    batch_size: PosInt = Field(16, description="Rows per generation batch.")
    device: Device = "auto"


class EvaluateConfig(EvalOptions):
    model: str = Field(description="The model to evaluate: a folder or hub id.")
    out: str = Field(description="Folder for eval.json and the manifest.")
