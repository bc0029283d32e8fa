"""What a stage is: a declaration, registered once, that the executor runs and the CLI and API expose.

A stage module holds its compute function and one `Stage(...)` that says everything else about it: its config
model, which config fields name its inputs and whose output each must be, the files it writes, the optional
modules it needs, what identifies a run beyond its config and inputs, its typed result and its summary for the
terminal. `curate.executor` does the lifecycle every stage shares (locks, resume, verification, manifests),
`curate.registry` finds the stages; adding a stage is one declaration, with no table to edit elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class Input:
    """A config field that names an input. `kind`: the kind of output it must be (scores, pruned, model, ...),
    whichever stage produced it, verified against that stage's manifest before anything else; `data`: user data,
    identified by its contents; `file_ok`: a plain file is taken as data too; `model`: a model folder or hub id,
    which the stage identifies by its content hash (`identify`); none of these: the stage finds and identifies it
    itself. Either way the field's text is not part of the fingerprint: the same input named from another folder is
    the same run. `field` may be dotted (`eval.data`) for a sectioned config."""

    field: str
    kind: str | tuple[str, ...] | None = None  # several: any of these kinds is taken
    data: bool = False
    file_ok: bool = False
    model: bool = False
    hint: str = ""


class Manifest(BaseModel):
    """A finished stage's `_manifest.json`, typed; stage results add their own fields. Item access
    (`m["counts"]`) reads the same fields, for code that treats manifests as the JSON they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    stage: str
    fingerprint: str
    curate_version: str
    finished_at: str
    wall_time_s: float
    files: list[dict]
    inputs: list[dict] = []
    config: dict = {}
    outputs: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def __contains__(self, key: str) -> bool:
        return key in type(self).model_fields or key in (self.model_extra or {})


Summary = Callable[[Manifest], list]  # lines (str) and Rich renderables for the terminal


@dataclass(frozen=True)
class Resources:
    """What a sharded stage asks of an engine, from its own options, in one vocabulary for every stage and engine
    (as a NeMo Curator stage declares its `resources`): an engine reads this, never a stage's config."""

    engine: str = "local"  # "local" (this process, or local processes) or "ray"
    workers: int | None = None  # at once; none said: 1 locally, on Ray one per GPU (per `gpus_per_worker` GPUs)
    gpus_per_worker: float | None = None  # none said: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    address: str | None = None  # Ray: the cluster to join (none: a local one is started)


class Worker:
    """A sharded stage's worker, built once per process or Ray actor (`Shards.worker(work, output, gpus)`): `run`
    does one shard and returns what `reduce` needs of it (small: it may come back from another machine;
    `progress(units, tokens)` adds what the shard has done so far). The rest have defaults a worker overrides where
    it needs to: `open` (load the model; a value logged), `stream` (work ahead: tokenise the next shards while one is
    scored), `info` (where its time went) and `close`."""

    def open(self) -> Any:
        return None

    def run(self, shard: Any, progress: Callable[..., None]) -> dict:
        raise NotImplementedError

    def stream(self, shards: list, progress_for: Callable[[Any], Callable[..., None]]):
        """(shard, result) for each of `shards`, in order."""
        for shard in shards:
            yield shard, self.run(shard, progress_for(shard))

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Shards:
    """Work in independent shards, declared by the stage and run by the executor: it plans the shards, keeps the
    ones a run with this fingerprint finished (an interrupted run redoes only the rest), hands the others to the
    engine the stage's `resources` name (`curate.engines`: in this process, in local processes, on Ray), and reduces
    every shard's result into the manifest's fields. Shards and `work` travel to Ray workers: both must pickle.

    Each shard is one Parquet file (`output`), which its worker writes through the `ShardOutput` it is given
    (`output.write_parquet(name, table, metadata)`): the executor marks it there with the run's fingerprint and
    checks that mark to know what is finished; a stage says nothing about completion."""

    plan: Callable[[Any], list]  # (Job) -> the shards, each with an `index`
    output: Callable[[Any], str]  # (shard) -> the file it writes, relative to OUT
    work: Callable[[Any], Any]  # (Job) -> what every worker needs, once (`job.finished`: the shards kept)
    worker: Callable[[Any, Any, float], Worker]  # (work, ShardOutput, GPUs it may use) -> a worker
    reduce: Callable[[Any, list, dict, dict], dict]  # (Job, shards, {index: result}, engine info) -> fields
    size: Callable[[Any], int] = lambda shard: 1  # progress units of a shard (rows for score)
    unit: str = "shards"
    resources: Callable[[Any], Resources] = lambda cfg: Resources()  # (config) -> what to run the workers on


@dataclass(frozen=True)
class Cli:
    """How `curate NAME` and `curate.NAME(...)` present a stage; nothing here changes what it computes. Its place in
    `curate --help` is derived (`registry.in_order`): after the stages whose output kinds it reads."""

    arguments: tuple[str, ...] = ()  # fields given positionally on the command line (and to `curate.NAME`)
    first: tuple[str, ...] = ("out",)  # options listed first in --help
    # A config with sections (score/prune/train): the options the command exposes, as (section or None for the top
    # level, its model, field names); every other setting is in the stage's YAML form
    sections: tuple = ()
    file: str | None = None  # the config is a YAML file (`curate NAME FILE --set k=v`); the argument's help
    # Kinds it reads where no input declares them (a run folder of several kinds, a model named by path or hub id):
    # only its place in --help
    follows: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[BaseModel]
    compute: Callable[[Any], dict] | None = None  # (Job) -> the manifest's own fields; writes the outputs into job.out
    produces: str = ""  # the kind of output (scores, pruned, model...) that consumers ask for; default: the name
    doc: str = ""  # one line for `--help`
    inputs: tuple[Input, ...] = ()
    outputs: tuple[str, ...] = ()  # file patterns, `folder/` for a folder only this stage writes
    needs: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # optional modules, for these settings
    identify: Callable[[Any], dict] | None = None  # (Job) -> what else identifies a run (models, formats)
    then: Callable[[Any], list] = lambda cfg: []  # (cfg) -> [(stage name, config)] to run after this one
    result: type[Manifest] = Manifest
    summary: Summary = lambda manifest: []
    resumable: bool = False  # keeps partial output of the same run (shards, checkpoints)
    expensive: bool = False  # refuses to replace other settings' output without --force
    walks: bool = False  # runs other stages: a rerun walks them again (each reuses its own finished result)
    shards: Shards | None = None  # work in shards that the executor runs (`compute` is then not called)
    out: Callable[[Any], str] = lambda cfg: cfg.out  # where a config's output goes
    cli: Cli = Cli()  # how the command shows it: positional arguments, sections, a config file

    @property
    def kind(self) -> str:
        return self.produces or self.name

    def output_folder(self, cfg: BaseModel) -> str:
        """Where a config's output goes: a path, or a URL (never folded through Path, which breaks `s3://`)."""
        return str(self.out(cfg))

    def output_field(self) -> str | None:
        """The config field that names the output folder (`out`, `run_dir`): `out` asked of a config whose every
        field holds its own name; None where the folder is no one field."""
        names = self.config.model_construct(**{name: name for name in self.config.model_fields})
        found = self.output_folder(names)
        return found if found in self.config.model_fields else None

    def places(self) -> list[tuple[str, bool]]:
        """The config fields that name a file, a folder or a model, each with whether it is a model (a hub id as
        often as a folder): its inputs and its output folder. A config file's paths are these."""
        fields = [(spec.field, spec.model) for spec in self.inputs]
        output = self.output_field()
        return [*fields, (output, False)] if output else fields


def in_fingerprint(model: type[BaseModel], field: str) -> bool:
    """Whether a config field changes a stage's result. Fields that only say how or where it runs are declared
    with `json_schema_extra=RUNTIME` (`curate.config.base`), so a new engine-only option cannot break resuming."""
    extra = model.model_fields[field].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("fingerprint") is False)


def fingerprint_name(model: type[BaseModel], field: str) -> str:
    """The name a field is fingerprinted under: its own, or for a renamed one (declared `formerly`, in
    `curate.config.base`) the name runs were identified by before, so that a rename changes no run's identity."""
    extra = model.model_fields[field].json_schema_extra
    return extra.get("formerly", field) if isinstance(extra, dict) else field


def fingerprinted(value: Any, dumped: Any) -> Any:
    """`dumped` (`value.model_dump()`, or a part of it) with every renamed field under its fingerprint name, in
    sections and lists of them too."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {
            fingerprint_name(type(value), k) if k in fields else k: fingerprinted(getattr(value, k, None), v)
            for k, v in dumped.items()
        }
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [fingerprinted(a, b) for a, b in zip(value, dumped)]
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: fingerprinted(value.get(k), v) for k, v in dumped.items()}
    return dumped
