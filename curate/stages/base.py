"""What every stage does before its own work: is OUT already done, partial, or someone else's?

A stage run is identified by its fingerprint (inputs, settings, versions). `begin` returns the finished manifest
when OUT already holds this exact, intact result; otherwise it prepares OUT for the run: it keeps partial output
of the same run (`resumable` stages continue from it), clears output of other settings (or refuses, for stages
whose output is expensive, unless `force`), and records the run in `OUT/.run.json` so that a later attempt can
tell its own partial output from a stranger's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import io
from ..errors import CurateError, StaleOutputError
from ..progress import Reporter
from ..schema import MANIFEST

RUN_STAMP = ".run.json"


def check_not_input(out: Path, *inputs: Path) -> None:
    for folder in inputs:
        if io.same_folder(out, folder):
            raise CurateError(f"--out {out} is the input folder itself; write the output somewhere else")


def clear(out: Path, outputs: tuple[str, ...]) -> None:
    for pattern in (*outputs, MANIFEST, RUN_STAMP):
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if out.is_dir():
        io.remove_temporaries(out)


def _reuse_or_clear(
    out: Path,
    stage: str,
    fingerprint: str,
    outputs: tuple[str, ...],
    reporter: Reporter,
    resumable: bool,
    expensive: bool,
) -> dict | None:
    manifest = io.read_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest["stage"] != stage:
        raise CurateError(
            f"{out} is not a `curate {stage}` folder: it holds the output of `curate "
            f"{manifest['stage']}`; choose another --out (or --force to replace it)"
        )
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        problems = io.file_problems(out, manifest)
        if not problems:
            reporter.log(f"{out}: already done with these inputs and settings; nothing to do (--force redoes it)")
            return manifest
        for name, what in problems:
            reporter.log(f"warning: {out / name}: {what}; recomputing it")
            if resumable:
                (out / name).unlink(missing_ok=True)
        (out / MANIFEST).unlink()
        if not resumable:
            clear(out, outputs)
        return None
    stamp = io.read_json(out / RUN_STAMP) if (out / RUN_STAMP).exists() else None
    if manifest is None and stamp is None:
        strangers = [p for pattern in outputs for p in out.glob(pattern)] if out.is_dir() else []
        if strangers:
            raise CurateError(
                f"{out} holds {strangers[0].name}, which q-curate did not write there; choose another "
                "--out, or use --force to replace it"
            )
    elif manifest is not None or stamp.get("fingerprint") != fingerprint:
        if expensive:
            raise StaleOutputError(
                f"{out} holds {stage} output from other inputs or settings; use --force to replace it "
                "or choose another --out"
            )
        clear(out, outputs)
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
) -> dict | None:
    """The finished manifest if OUT holds exactly this result, intact; else None after preparing OUT."""
    if force:  # whatever is there, even a damaged manifest, is replaced
        clear(out, outputs)
    elif (done := _reuse_or_clear(out, stage, fingerprint, outputs, reporter, resumable, expensive)) is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    io.remove_temporaries(out)
    io.write_json_atomic(out / RUN_STAMP, {"stage": stage, "fingerprint": fingerprint})
    return None
