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
from pathlib import Path

import polars as pl

from .. import schema, wiring
from ..config.prune import PruneOptions
from ..config.refresh import RefreshConfig, TrainCommandConfig
from ..config.report import ReportConfig
from ..config.score import SCORE_OPTIONS, ScoreOptions
from ..config.train import TrainOptions
from ..errors import CurateError
from ..executor import Job, execute, identify_model, needed_modules, run_stage, runner
from ..registry import get, register
from ..stage import Cli, Input, Manifest, Stage


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


def train_with_command(job: Job) -> dict:
    """The user's training command, with {data}, {model} and {out} filled in; it must leave a model in OUT."""
    cfg, out = job.cfg, job.out
    cmd = cfg.command  # str.replace, not format: the command may contain other braces (JSON, shell)
    for key, value in (("data", cfg.data), ("model", job.context["model"].path), ("out", str(out))):
        cmd = cmd.replace("{" + key + "}", shlex.quote(value))
    job.log(f"training: {cmd}")
    result = subprocess.run(cmd, shell=True)
    if result.returncode != 0:
        raise CurateError(f"the training command failed with exit code {result.returncode}: {cmd}")
    if not (out / "config.json").exists():
        raise CurateError(
            f"the training command finished but {out} holds no model (config.json); it must save "
            "the trained model (merged, not a bare adapter) to the folder given as {out}"
        )
    model = job.context["model"]
    return {"command": cmd, "base_model": model.entry()}


TRAIN_COMMAND = register(
    Stage(
        name="train-command",
        produces="model",
        config=TrainCommandConfig,
        doc="Train with your own command (as `curate refresh --train-cmd` does each round).",
        compute=train_with_command,
        identify=identify_model,
        inputs=(
            Input("data", kind="pruned", hint="train on the output of `curate prune`"),
            Input("model", model=True),
        ),
        outputs=schema.MODEL_FILES,
        cli=Cli(arguments=("data",)),
    )
)


def rounds(job: Job) -> dict:
    """Run (or resume) the rounds; each stage is skipped when its manifest matches, so a rerun resumes."""
    cfg, out, reporter, force = job.cfg, job.out, job.reporter, job.force
    model = cfg.score.model
    summary: dict = {"rounds": [], "transitions": []}
    previous = None
    for r in range(1, cfg.rounds + 1):
        d = wiring.round_dir(out, r)
        reporter.log(f"round {r}/{cfg.rounds}: scoring the full input with {model or 'the built-in model'}")
        scored = run_stage("score", wiring.score_config(cfg.score, cfg.input, d / "scores", model), reporter, force)
        pruned = run_stage("prune", wiring.prune_config(cfg.prune, d / "scores", d / "pruned"), reporter, force)
        if cfg.train_cmd:
            command = TrainCommandConfig(
                command=cfg.train_cmd, data=str(d / "pruned"), model=scored["model"]["path"], out=str(d / "model")
            )
            execute(TRAIN_COMMAND, command, reporter, force)
        else:
            # with prune.target_model the first round trains that model, on its own tokens
            later = model if r > 1 else None
            options = wiring.train_config(cfg.train, cfg.prune, d / "pruned", d / "model", model, continue_from=later)
            run_stage("train", options, reporter, force)
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
    return {"summary": summary}


class RefreshResult(Manifest):
    summary: dict


def summary_lines(m: RefreshResult) -> list:
    from rich.table import Table

    summary, run_dir = m.summary, Path(m.config["out"])
    t = Table(title=f"refresh: {run_dir}")
    for col in ("round", "scored by", *(f"{q} (kept)" for q in schema.QUADRANTS), "kept", "loss tokens"):
        t.add_column(col, justify="left" if col == "scored by" else "right")
    for r in summary["rounds"]:
        q, k = r["quadrants"], r["kept_by_quadrant"]
        scorer = "start model" if r["round"] == 1 else f"round {r['round'] - 1} model"
        t.add_row(
            str(r["round"]),
            scorer,
            *(f"{q[x]:,} ({k[x]:,})" for x in schema.QUADRANTS),
            f"{r['K']:,} / {r['N']:,}",
            f"{r['loss_token_ratio']:.1%}",
        )
    lines: list = [t]
    for tr in summary["transitions"]:
        moves = Table(title=f"quadrants, round {tr['from']} -> {tr['to']}")
        moves.add_column(f"round {tr['from']}")
        for q in schema.QUADRANTS:
            moves.add_column(f"{q} in {tr['to']}", justify="right")
        for q, row in tr["counts"].items():
            moves.add_row(q, *(f"{row[p]:,}" for p in schema.QUADRANTS))
        lines += [
            moves,
            f"{tr['stayed']:,} of {tr['samples']:,} samples stayed in their quadrant; "
            f"{tr['kept_both']:,} were kept in both rounds",
        ]
    lines.append(f"rounds: {run_dir}/round-NN/{{scores,pruned,model}}; summary: {run_dir}/_manifest.json")
    lines.append(f"report: {run_dir / 'report' / 'report.html'}")
    return lines


def needs(cfg: RefreshConfig) -> tuple[str, ...]:
    score_cfg = wiring.score_config(cfg.score, cfg.input, Path(cfg.out))
    prune_cfg = wiring.prune_config(cfg.prune, Path(cfg.out), Path(cfg.out))
    modules = [*needed_modules(get("score"), score_cfg), *needed_modules(get("prune"), prune_cfg)]
    return tuple(modules if cfg.train_cmd else [*modules, *needed_modules(get("train"), cfg.train)])


STAGE = register(
    Stage(
        name="refresh",
        produces="refresh",
        config=RefreshConfig,
        doc="The dynamic loop: score with the current model, prune, train, and re-score with the new checkpoint; "
        "then the report. Every other stage setting (scope, lam, LoRA alpha, ...) is available in a pipeline config "
        "with a refresh section: see pipelines/refresh.yaml and `curate run`.",
        compute=rounds,
        inputs=(Input("input", data=True, hint="the SFT data to score each round"),),
        needs=lambda cfg: (*needs(cfg), "matplotlib", "plotly"),  # the report follows: fail now, not after the loop
        walks=True,  # an interrupted loop resumes at the round and stage where it stopped
        then=lambda cfg: [("report", ReportConfig(run=cfg.out))],
        result=RefreshResult,
        summary=summary_lines,
        cli=Cli(
            arguments=("input",),
            sections=(
                (None, RefreshConfig, ("input", "out", "rounds", "train_cmd")),
                ("score", ScoreOptions, SCORE_OPTIONS),
                ("prune", PruneOptions, ("ratio", "token_ratio")),
                ("train", TrainOptions, ("epochs", "max_steps", "lr", "batch_size", "lora_rank")),
            ),
        ),
    )
)
run = runner(STAGE)
