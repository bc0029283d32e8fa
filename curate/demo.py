"""`curate demo`: the whole pipeline on the built-in demo data with the built-in model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_data_path() -> Path:
    return Path(str(resources.files("curate") / "data" / "demo.jsonl"))


def run_demo(out_dir: Path, *, force: bool, console, score_fn, print_score) -> None:
    from .stages.score import ScoreConfig

    scores_dir = out_dir / "scores"
    cfg = ScoreConfig(input=str(demo_data_path()), out=str(scores_dir))
    manifest = score_fn(cfg, force)
    print_score(manifest)
    console.print(f"\n[bold green]Demo finished.[/] Scores: {scores_dir}/part-*.parquet (manifest: {scores_dir}/_manifest.json)")
