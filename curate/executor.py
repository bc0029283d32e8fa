"""The lifecycle every stage shares, written once: `execute(stage, cfg)`.

1. OUT is none of the inputs; the optional modules the stage needs with these settings are installed.
2. Every input is verified against the manifest of the stage that wrote it (or, for user data, hashed).
3. The fingerprint: the stage, its config (less the fields `curate.config` declares RUNTIME), its inputs'
   fingerprints, what `identify` adds (model hashes, resolved formats) and the q-curate version, always.
4. Under OUT's lock: reuse a finished identical result, resume partial output of the same run, or refuse or
   clear other output (`curate.outdir`); then compute. An OUT at a URL is a working copy in the cache
   (`curate.storage`), fetched under the bucket's lock object before step 2 and uploaded after every change.
5. The manifest, written last: every output file with its size and checksum, the inputs (paths relative to OUT)
   and the output patterns, so `verify` knows what may be there. Then the stages the result asks for (`then`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import __version__, engines, io, kinds, outdir, readers, storage
from .engines import ShardTask
from .errors import CurateError
from .extras import require
from .progress import Reporter
from .registry import get
from .stage import Manifest, Stage, fingerprint_name, fingerprinted, in_fingerprint


@dataclass
class Job:
    """What a stage's `identify` and `compute` see of one run."""

    stage: Stage
    cfg: Any
    out: Path
    reporter: Reporter
    force: bool
    inputs: dict[str, Path]  # config field -> path
    # config field -> the verified manifest of that input, typed as its kind's contract (`curate.kinds`); None for data
    manifests: dict[str, Manifest | None]
    input_fingerprints: dict[str, str]
    started: float = field(default_factory=time.time)
    fingerprint: str = ""
    context: dict = field(default_factory=dict)  # what identify resolved, for compute (models, plans)
    remote: storage.RemoteFolder | None = None  # OUT is a URL: job.out is its working copy
    given: dict[str, str] = field(default_factory=dict)  # config field -> the URL given, where a copy stands in
    # output name -> its manifest entry where the stage has it already (a shard checksummed where it was written,
    # on this machine or another): not read and hashed a second time
    entries: dict[str, dict] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)  # a sharded stage: the shards an earlier attempt finished

    def log(self, message: str) -> None:
        self.reporter.log(message)

    def fingerprint_with(self, identity: dict) -> str:
        """The run's fingerprint if `identify` returned `identity` (for a stage that must compare candidates)."""
        return io.fingerprint_config(
            {
                "stage": self.stage.name,
                "config": fingerprinted_config(self.cfg, self.stage),
                "inputs": self.input_fingerprints,
                "identity": identity,
                "version": __version__,
            }
        )


def fingerprinted_config(cfg: BaseModel, stage: Stage) -> dict:
    """The config fields that change a result: not the runtime ones, not where inputs and output are."""
    places = {"out", *(i.field for i in stage.inputs)}
    kept = {k: v for k, v in cfg.model_dump().items() if k not in places and in_fingerprint(type(cfg), k)}
    return {fingerprint_name(type(cfg), k): fingerprinted(getattr(cfg, k), v) for k, v in kept.items()}


def needed_modules(stage: Stage, cfg: Any) -> tuple[str, ...]:
    """The stage's optional modules with these settings (with none given: its defaults)."""
    return tuple(stage.needs(cfg if cfg is not None else stage.config.model_construct()))


def require_stage(stage: Stage | str, cfg: Any = None) -> None:
    """Before any work: the modules `stage` will import with these settings, or one error with the install hint."""
    stage = get(stage) if isinstance(stage, str) else stage
    require(*needed_modules(stage, cfg), purpose=f"curate {stage.name}")


def identify_model(job: Job, key: str = "model") -> dict:
    """`identify` for a stage whose config names a model (`cfg.model`): resolved once, into `job.context[key]`,
    and identified by the hash of its files' contents."""
    from .models import resolve_model

    job.context[key] = model = resolve_model(job.cfg.model, log=job.log)
    return {key: model.hash}


def field_value(cfg: Any, field: str) -> Any:
    """A config field by name, dotted for a section's (`eval.data`)."""
    for part in field.split("."):
        cfg = getattr(cfg, part, None) if cfg is not None else None
    return cfg


def _verified_inputs(stage: Stage, cfg: Any, out: Path, log) -> tuple[dict, dict, dict, dict]:
    """(paths, manifests, fingerprints, given): a stage output at a URL is verified in its working copy, which
    then stands in for it (`given` keeps the URL); user data at a URL is read where it is, by ranges."""
    paths, manifests, fingerprints, given = {}, {}, {}, {}
    for spec in stage.inputs:
        value = field_value(cfg, spec.field)
        if value is None or spec.model:
            continue
        if storage.is_url(value) and spec.kind and not spec.data:
            given[spec.field] = value
            value = storage.RemoteFolder(value).pull(log)
        if spec.data and readers.is_many_or_remote(value):  # a URL, glob or list: identified by its files
            paths[spec.field], manifests[spec.field] = str(value), None
            fingerprints[spec.field] = readers.fingerprint(str(value))
            continue
        if storage.is_url(value):  # a folder the stage finds and identifies itself (`report RUN`)
            if value.rstrip("/") == str(out).rstrip("/"):
                raise CurateError(f"--out {out} is the input folder itself; write the output somewhere else")
            paths[spec.field], manifests[spec.field] = value, None
            continue
        path = paths[spec.field] = storage.local(value)
        outdir.check_not_input(out, path)
        if spec.file_ok and not path.exists():
            raise CurateError(f"{path}: no such file or folder ({spec.hint})")
        if spec.kind and not (spec.file_ok and path.is_file()):
            verified = io.verified(path, spec.kind, spec.hint)
            manifests[spec.field] = kinds.typed(verified, io.manifest_kind(verified), str(path))
            fingerprints[spec.field] = manifests[spec.field]["fingerprint"]
        elif spec.data or spec.file_ok:
            if not path.exists():
                raise CurateError(f"{path}: no such file or folder ({spec.hint or spec.field})")
            manifests[spec.field] = None
            fingerprints[spec.field] = io.fingerprint_path(path)
    return paths, manifests, fingerprints, given


def execute(
    stage: Stage, cfg: Any, reporter: Reporter | None = None, force: bool = False, option: str | None = None
) -> Manifest:
    """Run `stage` with `cfg` (see the module's docstring); returns its typed result. `option`: what the user sets
    OUT with, for the refusals to name (a pipeline step's folder is the run's: `run_dir`); by default the command's
    option, `--out` (or its config file's key, `run_dir`)."""
    reporter = reporter or Reporter()
    option = option or out_option(stage)
    started = time.time()
    require_stage(stage, cfg)
    where = stage.output_folder(cfg)
    if storage.is_url(where):
        remote = storage.RemoteFolder(where)
        # locked first: the working copy in the cache is shared by every run on this machine
        with remote.locked(reporter.log):
            local = remote.pull(reporter.log)
            job = _prepare(stage, cfg.model_copy(update={"out": str(local)}), reporter, force, started, remote)
            manifest = _begin(job, option) or _compute(job)
    else:
        io.resolved(Path(where))  # a symbolic link loop: named before any work
        job = _prepare(stage, cfg, reporter, force, started, None)
        with io.locked(job.out, reporter.log):  # after identify: a refused run leaves no folder behind
            manifest = _begin(job, option) or _compute(job)
    result = stage.result.model_validate(_as_given(manifest, job.given))
    for name, follow_up in stage.then(job.cfg.model_copy(update=job.given)):  # the URLs given, not working copies
        execute(get(name), follow_up, reporter, force)
    return result


def _prepare(stage: Stage, cfg: Any, reporter: Reporter, force: bool, started: float, remote) -> Job:
    """Steps 1-3: the inputs verified (a stage output at a URL through its working copy) and the run identified."""
    out = Path(stage.output_folder(cfg))
    paths, manifests, fingerprints, given = _verified_inputs(stage, cfg, out, reporter.log)
    if remote:
        given["out"] = remote.url
    cfg = cfg.model_copy(update={f: str(paths[f]) for f in given if f != "out" and "." not in f})
    job = Job(stage, cfg, out, reporter, force, paths, manifests, fingerprints, started, remote=remote, given=given)
    identity = stage.identify(job) if stage.identify else {}
    job.fingerprint = job.fingerprint_with(identity)
    return job


def out_option(stage: Stage) -> str:
    """What a user sets the stage's OUT with: `--out`, or the key of its config file (`run_dir`)."""
    field = stage.output_field() or "out"
    return "--" + field.replace("_", "-") if not stage.cli.file else field


def _begin(job: Job, option: str) -> dict | None:
    stage = job.stage
    done = outdir.begin(
        job.out,
        stage.name,
        job.fingerprint,
        outputs=stage.outputs,
        reporter=job.reporter,
        force=job.force,
        resumable=stage.resumable,
        expensive=stage.expensive,
        reusable=not stage.walks,
        option=option,
    )
    if job.remote:
        job.remote.push(job.reporter.log)  # what begin cleared goes from the bucket too, before any new file
    return done


def _compute(job: Job) -> dict:
    fields = run_shards(job) if job.stage.shards else job.stage.compute(job)
    manifest = _finish(job, fields)
    if job.remote:
        job.remote.push(job.reporter.log)
    return manifest


# ---------------------------------------------------------------- shards, and their completion


MARKER = "run_fingerprint"  # in every shard's Parquet metadata: the run that finished it


@dataclass(frozen=True)
class ShardOutput:
    """Where a sharded stage's workers write their shards, and the completion marker the executor puts in each: the
    run's fingerprint, in the shard's own Parquet metadata, so that a shard and its marker land in one rename (as
    datatrove's executor marks a finished rank, `mark_rank_as_completed`, but with no second file to disagree with
    the first). Picklable: it travels to worker processes and Ray actors."""

    out: str  # OUT: on this machine a folder, or the working copy of `url`
    fingerprint: str
    url: str | None = None  # OUT is this URL: each shard is also uploaded, whole, as it is finished

    @property
    def folder(self) -> Path:
        """Where shards are written on this node: OUT, or the working copy of OUT's URL (Ray: any node)."""
        return storage.staging_dir(self.url) if self.url else Path(self.out)

    def write_parquet(self, name: str, table, metadata: dict) -> None:
        """Shard `name` (relative to OUT), atomically, marked finished by this run: a killed run keeps it. Its
        Parquet metadata: the table's own, the mark, then `metadata`."""
        io.write_parquet_atomic(table, self.folder / name, {MARKER: self.fingerprint, **metadata})
        if self.url:
            storage.RemoteFolder(self.url).upload(name)


def finished_by(path: Path, fingerprint: str) -> bool:
    """Whether the shard at `path` was finished by the run with this fingerprint; an unreadable one (damaged on
    disk) is removed, to be written again."""
    if not path.exists():
        return False
    try:
        return io.parquet_metadata(path).get(MARKER) == fingerprint
    except CurateError:
        path.unlink()
        return False


def run_shards(job: Job) -> dict:
    """A sharded stage's work: the shards this run finished before are kept (their marker is this run's), the
    others run on the stage's engine, then every shard's result is reduced into the manifest's fields."""
    sh = job.stage.shards
    shards = sh.plan(job)
    job.finished = [s.index for s in shards if finished_by(job.out / sh.output(s), job.fingerprint)]
    todo = [s for s in shards if s.index not in job.finished]
    if len(todo) < len(shards):
        job.log(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards are already done")
    output = ShardOutput(str(job.out), job.fingerprint, job.given.get("out"))
    task = ShardTask(job.stage.name, sh, sh.work(job), output, shards, todo, sh.resources(job.cfg))
    results, info = engines.pick(task)(task, job.reporter)
    return sh.reduce(job, shards, results, info)


def _recorded(job: Job, path) -> str:
    """An input as the manifest records it: relative to OUT on a local disk, the URL or absolute path where OUT
    is a URL (its working copy is no place to be relative to)."""
    if storage.is_url(path):
        return str(path)
    return str(Path(path).resolve()) if job.remote else io.record_path(job.out, path)


def _as_given(manifest: dict, given: dict) -> dict:
    """A manifest as the user sees it: the URLs given, not the working copies that stood in for them."""
    return {**manifest, "config": {**manifest.get("config", {}), **given}} if given else manifest


def run_stage(name: str, cfg: Any, reporter: Reporter | None = None, force: bool = False) -> Manifest:
    return execute(get(name), cfg, reporter, force)


def runner(stage: Stage):
    """`run(cfg, reporter=None, force=False)` for a stage module: its stage, executed."""

    def run(cfg: Any, reporter: Reporter | None = None, force: bool = False) -> Manifest:
        return execute(stage, cfg, reporter, force)

    run.__doc__ = stage.doc
    return run


def carried(job: Job, fields: dict) -> dict:
    """A stage that consumes and produces one kind (a filter between score and prune) carries its kind's contract
    from that input: each field it does not give itself, as the input has it."""
    for spec in job.stage.inputs:
        source = job.manifests.get(spec.field)
        if source is not None and io.manifest_kind(source) == job.stage.kind:
            return {**fields, **{k: source[k] for k in kinds.fields(job.stage.kind) if k not in fields}}
    return fields


def _finish(job: Job, fields: dict) -> dict:
    """The manifest of a computed run: every output file that is there, with its checksum."""
    names = sorted({*outdir.written(job.out, job.stage.outputs), *job.entries})
    inputs = [
        {
            "path": job.given.get(f) or _recorded(job, path),
            **(
                {"stage": job.manifests[f]["stage"], "kind": io.manifest_kind(job.manifests[f])}
                if job.manifests.get(f)
                else {}
            ),
            **({"fingerprint": job.input_fingerprints[f]} if f in job.input_fingerprints else {}),
        }
        for f, path in job.inputs.items()
    ]
    fields = {"config": job.cfg.model_dump(), **carried(job, fields)}  # a stage may record its config resolved
    kind = job.stage.kind
    if problems := kinds.problems(kind, fields):
        raise CurateError(
            f"curate {job.stage.name} produces {kind}, whose manifest carries {', '.join(kinds.fields(kind))}; "
            f"it gave: {'; '.join(problems)}"
        )
    fields["config"] = {**fields["config"], **job.given}  # never a working copy's path
    return io.write_manifest(
        job.out,
        job.stage.name,
        job.fingerprint,
        job.started,
        files=[job.entries.get(n) or io.file_entry(job.out, n) for n in names],
        kind=job.stage.kind,
        inputs=inputs,
        outputs=list(job.stage.outputs),
        **fields,
    )
