"""`curate report`'s options."""

from __future__ import annotations

from pydantic import Field

from .base import Options


class ReportConfig(Options):
    run: str = Field(
        description="A run folder (scores/ + pruned/), a `curate prune` folder, or a `curate refresh` folder."
    )
    out: str | None = Field(None, description="Where to write the report (default: RUN/report).")
    examples: int = Field(3, ge=0, description="Example samples shown per quadrant, token by token.")
    turns: bool = Field(
        False,
        description="Also draw, on the EU-plane picture, each multi-turn example's assistant turns joined to its "
        "conversation's point (off by default: on tool-call data the lines crowd the plane).",
    )
