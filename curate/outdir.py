"""What is in a stage's OUT before its work: its finished result, its partial output, or someone else's?

A stage run is identified by its fingerprint (inputs, settings, versions). `begin` returns the finished manifest
when OUT already holds this exact, intact result; otherwise it prepares OUT for the run: it keeps partial output
of the same run (`resumable` stages continue from it), clears output of other settings (or refuses, for stages
whose output is expensive, unless `force`), and records the run in `OUT/.run.json` so that a later attempt can
tell its own partial output from a stranger's.

A stage's outputs are declared as patterns of the files it writes (`data/train-*-of-*.parquet`, not `data`), or
as a folder ending in `/` that only it writes (trainer checkpoints). Clearing removes only those files, the files
the previous manifest lists, and its own temporaries where it writes them: never a user's file that happens to
sit in OUT. A folder it writes into that holds anything else is refused, with --force too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import io
from .errors import CurateError, StaleOutputError
from .progress import Reporter
from .schema import MANIFEST, RUN_STAMP


def check_not_input(out: Path, *inputs: Path) -> None:
    for folder in inputs:
        if io.same_folder(out, folder):
            raise CurateError(f"--out {out} is the input folder itself; write the output somewhere else")


def refuse_foreign_files(out: Path, outputs: tuple[str, ...], stage: str, option: str = "--out") -> None:
    """A folder inside OUT that the stage writes into (`data/`) must hold only its files: a user's file there
    would be mixed into the dataset, or deleted with the stage's output. `option`: what the user sets OUT with."""
    ours = set(io.outputs_matching(out, outputs))
    for path in io.files_in_write_places(out, outputs):
        if path not in ours:
            raise CurateError(
                f"{path} was not written by `curate {stage}`, which writes its own files in that folder; move it "
                f"or choose another {option} (nothing was deleted)"
            )


def written(out: Path, outputs: tuple[str, ...]) -> list[str]:
    """The names (relative to OUT) of the stage's output files that are there, for its manifest."""
    return [str(p.relative_to(out)) for p in io.outputs_matching(out, outputs)]


def clear(out: Path, outputs: tuple[str, ...], manifest: dict | None = None) -> None:
    """Remove the stage's own files from OUT (see the module's docstring), then the folders that leaves empty."""
    listed = [out / f["name"] for f in (manifest or {}).get("files", []) if _inside(out, out / f["name"])]
    for path in {*listed, *io.outputs_matching(out, outputs), out / MANIFEST, out / RUN_STAMP}:
        path.unlink(missing_ok=True)
    for pattern in outputs:
        if pattern.endswith("/"):
            for folder in out.glob(pattern.rstrip("/")):
                shutil.rmtree(folder, ignore_errors=True)
    for place in io.write_places(out, outputs):
        io.remove_temporaries(place)
    for folder in sorted({p.parent for p in listed if p.parent != out}, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _inside(out: Path, path: Path) -> bool:
    """A manifest is data: a name like `../x` must not reach outside OUT."""
    return path.resolve().is_relative_to(out.resolve())


def _reuse_or_clear(
    out: Path,
    stage: str,
    fingerprint: str,
    outputs: tuple[str, ...],
    reporter: Reporter,
    resumable: bool,
    expensive: bool,
    reusable: bool,
    option: str,
) -> dict | None:
    manifest = io.read_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest["stage"] != stage:
        raise CurateError(
            f"{out} is not a `curate {stage}` folder: it holds the output of `curate "
            f"{manifest['stage']}`; choose another {option} (or --force to replace it)"
        )
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        if not reusable:  # a stage that walks others again; its manifest is rewritten at the end
            return None
        problems = io.file_problems(out, manifest)
        if not problems:
            reporter.log(f"{out}: already done with these inputs and settings; nothing to do (--force redoes it)")
            return manifest
        for name, what in problems:
            reporter.log(f"warning: {out / name}: {what}; recomputing it")
            if resumable and _inside(out, out / name):
                (out / name).unlink(missing_ok=True)
        (out / MANIFEST).unlink()
        if not resumable:
            clear(out, outputs, manifest)
        return None
    stamp = io.read_json(out / RUN_STAMP) if (out / RUN_STAMP).exists() else None
    if manifest is None and stamp is None:
        strangers = io.outputs_matching(out, outputs) if out.is_dir() else []
        if strangers:
            raise CurateError(
                f"{out} holds {strangers[0].name}, which q-curate did not write there; choose another "
                f"{option}, or use --force to replace it"
            )
    elif manifest is not None or stamp.get("fingerprint") != fingerprint:
        # a run that failed before writing anything is no loss to redo
        if expensive and io.outputs_matching(out, outputs):
            raise StaleOutputError(
                f"{out} holds {stage} output from other inputs or settings; use --force to replace it "
                f"or choose another {option}"
            )
        clear(out, outputs, manifest)
    elif not resumable:
        clear(out, outputs)
    return None


def begin(
    out: Path,
    stage: str,
    fingerprint: str,
    *,
    outputs: tuple[str, ...],
    reporter: Reporter,
    force: bool,
    resumable: bool = False,
    expensive: bool = False,
    reusable: bool = True,
    option: str = "--out",
) -> dict | None:
    """The finished manifest if OUT holds exactly this result, intact (and the stage reuses results); else None
    after preparing OUT. `option`: what the user sets OUT with, for the refusals (a pipeline's `run_dir`)."""
    refuse_foreign_files(out, outputs, stage, option)
    if force:  # whatever the stage wrote there, even under a damaged manifest, is replaced
        clear(out, outputs, _readable_manifest(out))
    elif done := _reuse_or_clear(out, stage, fingerprint, outputs, reporter, resumable, expensive, reusable, option):
        return done
    out.mkdir(parents=True, exist_ok=True)
    for place in io.write_places(out, outputs):
        io.remove_temporaries(place)
    io.write_json_atomic(out / RUN_STAMP, {"stage": stage, "fingerprint": fingerprint})
    return None


def _readable_manifest(out: Path) -> dict | None:
    try:
        return io.read_manifest(out) if out.is_dir() else None
    except CurateError:  # damaged: --force replaces it without reading it
        return None
