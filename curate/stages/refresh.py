"""`curate refresh`: the dynamic loop. Each round scores the FULL input with the current model, prunes, and
trains; the new checkpoint scores the next round.

Layout: OUT/round-NN/{scores,pruned,model}/ each with its own manifest, and OUT/_manifest.json (stage
`refresh`: what each round kept and how samples moved between quadrants). Every stage is skipped when its
manifest matches, so an interrupted loop resumes at the round and stage where it stopped (and scoring resumes
at its last shard).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import polars as pl

from .. import __version__, io, schema
from ..config import PruneConfig, RefreshConfig, ScoreConfig, TrainConfig
from ..errors import CurateError
from ..extras import require_stages
from ..progress import Reporter
from . import base, prune, score, train


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:02d}"


def transition_table(before: pl.DataFrame, after: pl.DataFrame) -> dict:
    """Counts of samples by (quadrant in one round, quadrant in the next), over the ids both rounds scored."""
    joined = before.select("id", "quadrant", "kept").join(
        after.select("id", pl.col("quadrant").alias("next"), pl.col("kept").alias("kept_next")), on="id"
    )
    counts = {q: {p: 0 for p in schema.QUADRANTS} for q in schema.QUADRANTS}
    for q, p, n in joined.group_by("quadrant", "next").len().iter_rows():
        counts[q][p] = n
    return {
        "counts": counts,
        "samples": joined.height,
        "stayed": sum(counts[q][q] for q in schema.QUADRANTS),
        "kept_both": int((joined["kept"] & joined["kept_next"]).sum()),
    }


def run_train_cmd(template: str, data: Path, model: dict, out: Path, reporter: Reporter, force: bool = False) -> dict:
    """The user's training command, with {data}, {model} and {out} filled in; it must leave a model in out.
    `model` is the scoring manifest's model entry (path and content hash)."""
    started = time.time()
    fingerprint = io.fingerprint_config(
        {
            "cmd": template,
            "data": io.verified(data, "prune", "")["fingerprint"],
            "model": model["hash"],
            "version": __version__,
        }
    )
    done = base.begin(out, "train", fingerprint, outputs=(), reporter=reporter, force=force)
    if done:
        return done
    cmd = template  # str.replace, not format: the command may contain other braces (JSON, shell)
    for key, value in (("data", str(data)), ("model", model["path"]), ("out", str(out))):
        cmd = cmd.replace("{" + key + "}", shlex.quote(value))
    reporter.log(f"training: {cmd}")
    result = subprocess.run(cmd, shell=True)
    if result.returncode != 0:
        raise CurateError(f"the training command failed with exit code {result.returncode}: {cmd}")
    if not (out / "config.json").exists():
        raise CurateError(
            f"the training command finished but {out} holds no model (config.json); it must save "
            "the trained model (merged, not a bare adapter) to the folder given as {out}"
        )
    return io.write_manifest(
        out,
        "train",
        fingerprint,
        started,
        command=cmd,
        inputs=[{"path": str(data)}, {"model": model["path"], "hash": model["hash"]}],
    )


def run(cfg: RefreshConfig, reporter: Reporter | None = None, force: bool = False) -> dict:
    """Run (or resume) `cfg.rounds` rounds; returns the manifest, whose `summary` the report shows."""
    reporter = reporter or Reporter()
    started = time.time()
    out = Path(cfg.out)
    model = cfg.score.model
    score_cfg = ScoreConfig(**cfg.score.model_dump(), input=cfg.input, out=str(out))
    require_stages(("score", score_cfg), ("prune", None), *([] if cfg.train_cmd else [("train", cfg.train)]))
    summary: dict = {"rounds": [], "transitions": []}
    previous = None
    with io.locked(out, reporter.log):
        for r in range(1, cfg.rounds + 1):
            d = round_dir(out, r)
            reporter.log(f"round {r}/{cfg.rounds}: scoring the full input with {model or 'the built-in model'}")
            scored = score.run(
                ScoreConfig(**{**cfg.score.model_dump(), "model": model}, input=cfg.input, out=str(d / "scores")),
                reporter,
                force,
            )
            pruned = prune.run(
                PruneConfig(**cfg.prune.model_dump(), scores=str(d / "scores"), out=str(d / "pruned")), reporter, force
            )
            if cfg.train_cmd:
                run_train_cmd(cfg.train_cmd, d / "pruned", scored["model"], d / "model", reporter, force)
            else:
                # with prune.target_model the first round trains that model, on its own tokens
                target = cfg.prune.target_model
                options = {**cfg.train.model_dump(), "model": target if target and r == 1 else model}
                data = d / "pruned" / prune.TARGET if target else d / "pruned"
                train.run(TrainConfig(**options, data=str(data), out=str(d / "model")), reporter, force)
            samples = pl.read_parquet(d / "pruned" / schema.SAMPLES, columns=["id", "quadrant", "kept"], glob=False)
            st = pruned["stats"]
            summary["rounds"].append(
                {
                    "round": r,
                    "dir": d.name,
                    "model": scored["model"]["name"],
                    "quadrants": st["quadrants"],
                    "kept_by_quadrant": st["kept_by_quadrant"],
                    "K": st["K"],
                    "N": st["N"],
                    "loss_token_ratio": st["loss_token_ratio"],
                    "checkpoint": f"{d.name}/model",
                }
            )
            if previous is not None:
                summary["transitions"].append({"from": r - 1, "to": r, **transition_table(previous, samples)})
            previous = samples
            model = str(d / "model")
        return io.write_manifest(
            out, "refresh", io.fingerprint_config(cfg.model_dump()), started, config=cfg.model_dump(), summary=summary
        )
