"""`curate export`'s options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Options


class ExportConfig(Options):
    pruned: str = Field(description="A `curate prune` output folder.")
    format: Literal["llamafactory", "axolotl", "trl", "jsonl"] = Field(
        description="llamafactory (save_to_disk for tokenized_path), axolotl (pre-tokenised JSONL), trl (Parquet with "
        "labels), jsonl (every column)."
    )
    out: str = Field(description="Folder for the exported data and its config snippet.")
