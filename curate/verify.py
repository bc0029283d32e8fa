"""`curate verify PATH`: every finished stage under PATH, checked against its manifest."""

from __future__ import annotations

from pathlib import Path

from . import io, readers, storage
from .errors import CurateError
from .schema import LOCK, MANIFEST, RUN_STAMP


def verify_location(where: str) -> tuple[list[tuple[str, str, int, list]], bool]:
    """`verify_tree` for a path or a URL (checked in its working copy; folders are named as the user gave them)."""
    if not storage.is_url(where):
        return verify_tree(storage.local(where))
    remote = storage.RemoteFolder(where)
    if not remote.exists():
        raise CurateError(f"{where}: no such folder (nothing is stored there)")
    root = remote.pull()
    rows, bad = verify_tree(root)
    named = [(where if f == root else storage.join(where, str(f.relative_to(root))), *rest) for f, *rest in rows]
    return named, bad


def verify_tree(path: Path) -> tuple[list[tuple[Path, str, int, list]], bool]:
    """(folder, stage, number of files, problems) for every manifest under `path`, and whether any failed."""
    if not path.is_dir():
        raise CurateError(f"{path}: no such folder")
    rows = []
    for manifest_path in sorted(path.rglob(MANIFEST)):
        folder = manifest_path.parent
        try:
            manifest = io.read_manifest(folder)
        except CurateError as e:
            rows.append((folder, "?", 0, [(MANIFEST, str(e))]))
            continue
        problems = io.file_problems(folder, manifest)
        if io.manifest_kind(manifest) == "scores" and (changed := input_change(folder, manifest)):
            problems.append(("input", changed))
        rows.append((folder, manifest["stage"], len(manifest.get("files", [])), problems))
    if not rows:
        raise CurateError(f"{path}: no {MANIFEST} anywhere below; nothing q-curate finished is there")
    unlisted = unlisted_files(path)
    if unlisted:
        rows.append((path, "(none)", 0, [(str(f.relative_to(path)), UNLISTED) for f in unlisted]))
    return rows, any(problems for *_, problems in rows)


UNLISTED = "no manifest lists this file (not written by q-curate, or left by a run that did not finish)"


def unlisted_files(path: Path) -> list[Path]:
    """Files under `path` that no manifest there lists (a user's notes beside the data, a half-written export): the
    card of a pruned folder says its data is all there is, so anything else is named."""
    accounted = set()
    for manifest_path in path.rglob(MANIFEST):
        accounted.add(manifest_path)
        try:
            manifest = io.read_json(manifest_path)
        except CurateError:  # a damaged manifest: its own row says so
            continue
        for entry in manifest.get("files", []) if isinstance(manifest, dict) else []:
            accounted.add(manifest_path.parent / str(entry.get("name", "")))
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and f not in accounted and f.name not in OURS and not io.is_temporary(f)
    )


OURS = (LOCK, LOCK + ".takeover", RUN_STAMP)  # a run's lock and start stamp: present while it runs


def input_change(scores: Path, manifest: dict) -> str | None:
    """What changed in the input a score run read, when it is still there and no longer what was scored."""
    source = (manifest.get("inputs") or [{}])[0]
    if "path" not in source or "fingerprint" not in source or source.get("stage"):
        return None  # synthetic scores read no input; scores made from other scores were verified when read
    if readers.is_many_or_remote(source["path"]):  # a URL, glob or list: compared by the store's checksums
        try:
            now = readers.fingerprint(source["path"])
        except CurateError:  # no longer there: nothing to compare
            return None
        return None if now == source["fingerprint"] else f"{source['path']} changed after it was scored"
    path = io.recorded_path(scores, source["path"])
    if not path.exists() or io.fingerprint_path(path) == source["fingerprint"]:
        return None
    return f"{path} changed after it was scored (its contents differ from the fingerprint {scores} records)"
