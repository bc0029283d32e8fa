"""`curate refresh`: the dynamic loop. Each round scores the FULL input with the current model, prunes, and
trains; the new checkpoint scores the next round.

Layout: OUT/round-NN/{scores,pruned,model}/ each with its own manifest, and OUT/refresh.json (what each round
kept and how samples moved between quadrants). Every stage is skipped when its manifest matches, so an
interrupted loop resumes at the round and stage where it stopped (and scoring resumes at its last shard).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import polars as pl

from .. import __version__, io
from ..errors import CurateError
from .prune import PruneConfig
from .score import ScoreConfig
from .train import TrainConfig

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:02d}"


def transition_table(before: pl.DataFrame, after: pl.DataFrame) -> dict:
    """Counts of samples by (quadrant in one round, quadrant in the next), over the ids both rounds scored."""
    joined = before.select("id", "quadrant", "kept").join(
        after.select("id", pl.col("quadrant").alias("next"), pl.col("kept").alias("kept_next")), on="id")
    counts = {q: {p: 0 for p in QUADRANTS} for q in QUADRANTS}
    for q, p, n in joined.group_by("quadrant", "next").len().iter_rows():
        counts[q][p] = n
    return {"counts": counts, "samples": joined.height,
            "stayed": sum(counts[q][q] for q in QUADRANTS),
            "kept_both": int((joined["kept"] & joined["kept_next"]).sum())}


def run_train_cmd(template: str, data: Path, model: dict, out: Path, log, force: bool = False) -> dict:
    """The user's training command, with {data}, {model} and {out} filled in; it must leave a model in out.
    `model` is the scoring manifest's model entry (path and content hash)."""
    started = time.time()
    fingerprint = io.fingerprint_config({"cmd": template, "data": io.read_json(data / io.MANIFEST)["fingerprint"],
                                         "model": model["hash"], "version": __version__})
    if not force and (done := io.is_done(out, fingerprint)):
        log(f"{out}: already trained by the command; nothing to do")
        return done
    cmd = template  # str.replace, not format: the command may contain other braces (JSON, shell)
    for key, value in (("data", str(data)), ("model", model["path"]), ("out", str(out))):
        cmd = cmd.replace("{" + key + "}", shlex.quote(value))
    log(f"training: {cmd}")
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(cmd, shell=True)
    if result.returncode != 0:
        raise CurateError(f"the training command failed with exit code {result.returncode}: {cmd}")
    if not (out / "config.json").exists():
        raise CurateError(f"the training command finished but {out} holds no model (config.json); it must save "
                          "the trained model (merged, not a bare adapter) to the folder given as {out}")
    return io.write_manifest(out, "train", fingerprint, started, command=cmd,
                             inputs=[{"path": str(data)}, {"model": model["path"], "hash": model["hash"]}])


def run(out: Path, rounds: int, score: ScoreConfig, prune: PruneConfig, train: TrainConfig,
        train_cmd: str | None, stages: dict[str, Callable], log=lambda msg: None, force: bool = False) -> dict:
    """Run (or resume) `rounds` rounds. `stages` maps score/prune/train to callables taking (config, force),
    so the CLI can draw progress; returns the summary also written to OUT/refresh.json."""
    model = score.model
    summary = {"rounds": [], "transitions": []}
    previous = None
    for r in range(1, rounds + 1):
        d = round_dir(out, r)
        log(f"[bold]round {r}/{rounds}[/]: scoring the full input with {model or 'the built-in model'}")
        scored = stages["score"](replace(score, out=str(d / "scores"), model=model), force)
        pruned = stages["prune"](replace(prune, scores=str(d / "scores"), out=str(d / "pruned")), force)
        if train_cmd:
            run_train_cmd(train_cmd, d / "pruned", scored["model"], d / "model", log, force)
        else:
            stages["train"](replace(train, data=str(d / "pruned"), out=str(d / "model"), model=model), force)
        samples = pl.read_parquet(d / "pruned" / "samples.parquet", columns=["id", "quadrant", "kept"])
        st = pruned["stats"]
        summary["rounds"].append({"round": r, "dir": d.name, "model": scored["model"]["name"],
                                  "quadrants": st["quadrants"], "kept_by_quadrant": st["kept_by_quadrant"],
                                  "K": st["K"], "N": st["N"], "loss_token_ratio": st["loss_token_ratio"],
                                  "checkpoint": f"{d.name}/model"})
        if previous is not None:
            summary["transitions"].append({"from": r - 1, "to": r, **transition_table(previous, samples)})
        previous = samples
        model = str(d / "model")
    io.write_json_atomic(out / "refresh.json", summary)
    return summary
