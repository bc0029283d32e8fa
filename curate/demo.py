"""`curate demo`: the whole pipeline on the built-in demo data with the built-in model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_data_path() -> Path:
    return Path(str(resources.files("curate") / "data" / "demo.jsonl"))


def run_demo(out_dir: Path, *, force: bool, console, score_fn, prune_fn, print_score, print_prune) -> None:
    from .config import Pipeline, PruneSection, ScoreSection
    from .pipeline import run_pipeline

    pipeline = Pipeline(run_dir=str(out_dir), score=ScoreSection(input="demo"), prune=PruneSection(ratio=0.125))
    results = run_pipeline(pipeline, score_fn=score_fn, prune_fn=prune_fn, force=force)
    print_score(results["score"])
    print_prune(results["prune"])
    from .stages import report

    report_path = report.run(out_dir)
    console.print(f"\n[bold green]Demo finished.[/] Results in {out_dir}/:\n"
                  f"  scores:  {out_dir}/scores/part-*.parquet\n"
                  f"  pruned:  {out_dir}/pruned/data/train-*.parquet  (load with datasets.load_dataset('parquet', ...))\n"
                  f"  samples: {out_dir}/pruned/samples.parquet (every sample's ppl, ent, quadrant, fate)\n"
                  f"  stats:   {out_dir}/pruned/stats.json\n"
                  f"  report:  {report_path} (EU plane picture: {out_dir}/report/eu_plane.png)")
