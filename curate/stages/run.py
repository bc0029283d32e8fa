"""`curate run PIPELINE.yaml`: the stages a config describes, into one run folder (a stage that walks others).

Layout: RUN_DIR/pipeline.yaml (the config as resolved), RUN_DIR/scores/, RUN_DIR/pruned/, RUN_DIR/model/ (with a
train section), or RUN_DIR/round-NN/{scores,pruned,model}/ (with a refresh section); with `steps:`, one folder per
step (`step_folder`), each step's inputs the latest outputs of the kinds it asks for. Each stage is skipped when
its manifest matches its inputs and settings, so rerunning a finished pipeline walks them again and does nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .. import io, readers, wiring
from ..config.base import config_errors
from ..config.prune import PruneConfig
from ..config.refresh import RefreshConfig
from ..config.run import Pipeline, step_parts
from ..config.score import ScoreConfig
from ..config.train import TrainConfig, TrainOptions
from ..errors import CurateError, StaleOutputError
from ..executor import Job, execute, needed_modules, runner
from ..progress import Reporter
from ..registry import get, register
from ..stage import Cli, Manifest, Stage

RESOLVED = "pipeline.yaml"


def resolve_input(value: str) -> str:
    if value == "demo":
        from ..demo import demo_data_path

        return str(demo_data_path())
    return value


def stage_configs(p: Pipeline) -> tuple[ScoreConfig, PruneConfig | None, TrainConfig | None]:
    run_dir = Path(p.run_dir)
    score = wiring.score_config(p.score, resolve_input(p.score.input), run_dir / "scores")
    prune = train = None
    if p.prune is not None:
        prune = wiring.prune_config(p.prune, run_dir / "scores", run_dir / "pruned")
    if p.train is not None or p.refresh is not None:
        options = p.train or TrainOptions()
        train = wiring.train_config(options, p.prune, run_dir / "pruned", run_dir / "model", p.score.model)
    return score, prune, train


def refresh_config(p: Pipeline) -> RefreshConfig:
    score = p.score.model_dump(exclude={"input"})
    return RefreshConfig(
        **p.refresh.model_dump(),
        input=resolve_input(p.score.input),
        out=p.run_dir,
        score=score,
        prune=p.prune.model_dump(),
        train=(p.train or TrainOptions()).model_dump(),
    )


def step_folder(i: int, stage: Stage, name: str, produced: set[str], names: set[str]) -> str:
    """The folder of steps[i] when it is given no name: the kind it produces for the first step of that kind
    (scores, pruned, model: the folders of the sectioned form), else its stage's name for the first step of that
    stage (a stage of your own after score), else STAGE-I (prune-2, prune-3 after a first prune)."""
    if stage.kind not in produced:
        return stage.kind
    return name if name not in names else f"{name}-{i}"


def step_configs(p: Pipeline) -> list[tuple[str, BaseModel]]:
    """(stage, config) of each of `steps`: its options, its own output folder, and its inputs of a kind (a field it
    does not set) the latest output of that kind before it. Every problem of every step at once."""
    run_dir, latest, plan, problems = Path(p.run_dir), {}, [], []
    produced, names, folders = set(), set(), {RESOLVED: "the resolved config"}
    scoring_model = None
    for i, step in enumerate(p.steps):
        name, options, given = step_parts(step)
        try:
            stage = get(name)
        except CurateError as e:
            problems.append(f"  steps[{i}]: {e}")
            continue
        folder = given or step_folder(i, stage, name, produced, names)
        produced.add(stage.kind)
        names.add(name)
        if folder in folders:
            taken = f"its folder {folder} is {folders[folder]}'s"
            problems.append(f"  steps[{i}] ({name}): {taken}; give it another `name:`")
        folders.setdefault(folder, f"steps[{i}]")
        values = dict(options)
        for spec in stage.inputs:
            wanted = (spec.kind,) if isinstance(spec.kind, str) else spec.kind or ()  # several: the first one there
            found = next((latest[kind] for kind in wanted if kind in latest), None)
            if found and "." not in spec.field and spec.field not in values:
                values[spec.field] = str(found)
        if "input" in values and isinstance(values["input"], str):
            values["input"] = resolve_input(values["input"])
        if stage.kind == "scores" and "model" in values:
            scoring_model = values["model"]
        if stage.kind == "model" and "model" in stage.config.model_fields and "model" not in values:
            values["model"] = scoring_model  # the data's tokens are the scoring model's
        values.setdefault("out", str(run_dir / folder))
        try:
            plan.append((name, stage.config.model_validate(values)))
        except ValidationError as e:
            problems.append(config_errors(f"  steps[{i}] ({name})", e))
        latest[stage.kind] = values["out"]  # where it writes: its own folder, or the `out` it was given
    if problems:
        raise CurateError(f"pipeline steps: {len(problems)} problem(s):\n" + "\n".join(problems))
    return plan


def pipeline_stages(p: Pipeline) -> list[tuple[str, BaseModel]]:
    """(stage, config) of every stage the pipeline runs, in order."""
    if p.steps is not None:
        return step_configs(p)
    if p.refresh is not None:
        return [("refresh", refresh_config(p))]
    score_cfg, prune_cfg, train_cfg = stage_configs(p)
    return [
        ("score", score_cfg),
        *([("prune", prune_cfg)] if prune_cfg else []),
        *([("train", train_cfg)] if train_cfg else []),
    ]


def needs(p: Pipeline) -> tuple[str, ...]:
    try:
        stages = pipeline_stages(p)
    except CurateError:
        return ()  # identify reports the steps' problems
    return tuple(m for name, cfg in stages for m in needed_modules(get(name), cfg))


def identify(job: Job) -> dict:
    """Before any work: every step's config (all problems at once), and the scored input there."""
    p = job.cfg
    job.context["stages"] = stages = pipeline_stages(p)
    for name, cfg in stages:
        data = getattr(cfg, "input", None) if get(name).kind in ("scores", "refresh") else None
        if isinstance(data, str) and not readers.is_many_or_remote(data) and not Path(data).exists():
            raise CurateError(
                f"{name}.input: {data} does not exist (paths in a pipeline file are relative to the file); get the "
                "data as the file's comment says, or give it: --set score.input=PATH"
            )
    return {}


def compute(job: Job) -> dict:
    io.write_bytes_atomic(job.out / RESOLVED, yaml.safe_dump(job.cfg.model_dump(), sort_keys=False).encode())
    steps = []
    for name, cfg in job.context["stages"]:
        stage = get(name)
        execute(stage, cfg, job.reporter, job.force, option="run_dir")  # the step's folder is the run's
        out = Path(stage.output_folder(cfg))
        steps.append({"stage": name, "kind": stage.kind, "out": io.record_path(job.out, out)})
    return {"steps": steps}


class RunResult(Manifest):
    steps: list[dict]


def summary(m: RunResult) -> list:
    """Each step's own summary, from its manifest, then where the run is."""
    run_dir = Path(m.config["run_dir"])
    lines: list = []
    for step in m.steps:
        stage, folder = get(step["stage"]), run_dir / step["out"]
        manifest = io.read_manifest(folder)
        if manifest is not None:
            lines += stage.summary(stage.result.model_validate(manifest))
    return [*lines, f"run folder: {run_dir} (resolved config: {run_dir / RESOLVED})"]


STAGE = register(
    Stage(
        name="run",
        produces="run",
        config=Pipeline,
        doc="Run the stages a pipeline YAML describes (score -> prune [-> train], the refresh loop, or any `steps:`) "
        "into one run folder; finished stages are skipped.",
        compute=compute,
        identify=identify,
        outputs=(RESOLVED,),
        needs=needs,
        walks=True,
        out=lambda cfg: cfg.run_dir,
        result=RunResult,
        summary=summary,
        cli=Cli(file="Pipeline YAML (see pipelines/)"),
    )
)
run = runner(STAGE)


def run_pipeline(p: Pipeline, reporter: Reporter | None = None, force: bool = False) -> RunResult:
    return run(p, reporter, force)


def run_demo(out_dir: Path, reporter, force: bool = False, pipeline=None) -> RunResult:
    """Run the demo pipeline. A demo folder left by other settings or an older q-curate is recomputed (a minute
    on CPU), where `curate run` refuses to replace scores."""
    from ..demo import demo_pipeline

    pipeline = pipeline or demo_pipeline(out_dir)
    try:
        return run_pipeline(pipeline, reporter, force)
    except StaleOutputError:
        reporter.log(f"{out_dir} holds a demo run from other settings or an older q-curate; recomputing it")
        return run_pipeline(pipeline, reporter, True)
