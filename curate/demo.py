"""`curate demo`: the whole pipeline on the built-in demo data with the built-in model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_data_path() -> Path:
    return Path(str(resources.files("curate") / "data" / "demo.jsonl"))


def demo_pipeline(out_dir: Path):
    """The demo is an ordinary pipeline: the built-in data, the built-in model, 12.5% of samples."""
    from .config.prune import PruneOptions
    from .config.run import Pipeline
    from .config.score import ScoreSection

    return Pipeline(run_dir=str(out_dir), score=ScoreSection(input="demo"), prune=PruneOptions(ratio=0.125))
