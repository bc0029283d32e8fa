"""`curate retokenize`'s options."""

from __future__ import annotations

from pydantic import Field

from .base import Options, PosInt


class RetokenizeConfig(Options):
    pruned: str = Field(description="A `curate prune` output folder.")
    model: str = Field(
        description="The target model (local folder or hub id) whose tokenizer and chat template to use."
    )
    out: str = Field(description="Folder for the re-tokenised pruned dataset (same layout as `curate prune`).")
    max_length: PosInt | None = Field(None, description="Truncate longer target sequences (default: no limit).")
