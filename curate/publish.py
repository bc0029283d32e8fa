"""`curate push PRUNED DEST`: a pruned dataset, verified, published where others train from it.

What is uploaded is what the folder's manifest lists (the data, samples.parquet, stats.json, the card README.md)
and the manifest itself, checked against their checksums first: a damaged or unfinished folder is never published.
A Hub dataset repo gets them in one commit (the card's YAML header is what the Hub and `datasets.load_dataset`
read); any other URL or path gets one object per file and the manifest last, as every stage writes a bucket.
"""

from __future__ import annotations

import json
import posixpath
from fnmatch import fnmatch
from pathlib import Path

from . import io, storage
from .errors import CurateError
from .schema import MANIFEST, PRUNED_DATA, PRUNED_GLOB

HINT = "push the output of `curate prune`"


def files_to_push(folder: Path) -> list[str]:
    """The names (relative to the folder) that make up a pruned dataset, the manifest last."""
    manifest = io.verified(folder, "pruned", HINT)
    names = [f["name"] for f in manifest["files"]]
    if "README.md" not in names:
        raise CurateError(f"{folder}: no dataset card (README.md); prune it again with this q-curate to write one")
    return [*names, MANIFEST]


def hub_repo(dest: str) -> tuple[str, str | None, str]:
    """(repo id, revision, folder in the repo) of `hf://datasets/ORG/NAME[@REVISION][/FOLDER]`."""
    rest = dest.removeprefix("hf://")
    if not rest.startswith("datasets/"):
        raise CurateError(f"{dest}: push to a dataset repo, hf://datasets/ORG/NAME")
    parts = rest.removeprefix("datasets/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CurateError(f"{dest}: expected hf://datasets/ORG/NAME")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def overlapping(source: str, dest: str) -> bool:
    """Whether `dest` is `source`, inside it or around it (after resolving `..`, trailing slashes and symlinks):
    pushing there would delete the source's own files before copying them."""
    if storage.is_url(source) != storage.is_url(dest):
        return False
    if storage.is_url(source):
        a, b = (posixpath.normpath(u.split("://", 1)[1]).strip("/") for u in (source, dest))
        same_scheme = source.split("://", 1)[0] == dest.split("://", 1)[0]
        return same_scheme and (a == b or a.startswith(b + "/") or b.startswith(a + "/"))
    a, b = storage.local(source).resolve(), storage.local(dest).resolve()
    return a == b or a in b.parents or b in a.parents


def push(pruned: str, dest: str, log=lambda msg: None, private: bool = False, message: str | None = None) -> str:
    if overlapping(pruned, dest):
        raise CurateError(f"{dest}: the destination is {pruned} itself, inside it or holds it; push somewhere else")
    folder = storage.materialized(pruned, log)
    names = files_to_push(folder)
    if dest.startswith("hf://"):
        return _push_to_hub(folder, names, dest, private, message or f"q-curate: pruned dataset ({pruned})")
    return _push_to_folder(folder, names, dest)


def _push_to_hub(folder: Path, names: list[str], dest: str, private: bool, message: str) -> str:
    from .extras import require

    require("huggingface_hub", purpose="curate push to the Hub")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, revision, prefix = hub_repo(dest)
    api = HfApi()

    def in_repo(name: str) -> str:
        return "/".join(p for p in (prefix, name) if p)

    operations = [CommitOperationAdd(path_in_repo=in_repo(name), path_or_fileobj=str(folder / name)) for name in names]
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # the data shards of an earlier push go (3 old shards beside 1 new one would all be read as the data)
        ours = {in_repo(name) for name in names}
        stale = [
            f
            for f in api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
            if fnmatch(f, in_repo(f"{PRUNED_DATA}/{PRUNED_GLOB}")) and f not in ours
        ]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        commit = api.create_commit(repo_id, operations, commit_message=message, repo_type="dataset", revision=revision)
    except HfHubHTTPError as e:
        raise CurateError(f"{dest}: the Hub refused the upload ({e}); is HF_TOKEN set, with write access?") from None
    return commit.commit_url


def _push_to_folder(folder: Path, names: list[str], dest: str) -> str:
    """Every file as one write (an object, or a file renamed into place), the manifest last; a dataset pushed there
    before is replaced (only the files its manifest lists), anything else there is refused."""
    if not storage.is_url(dest):
        target = storage.local(dest)
        earlier = io.read_manifest(target) if target.is_dir() else None
        if target.is_dir() and any(target.iterdir()) and earlier is None:
            raise CurateError(f"{dest} holds files q-curate did not write; push into an empty or new folder")
        (target / MANIFEST).unlink(missing_ok=True)
        for entry in (earlier or {}).get("files", []):
            (target / entry["name"]).unlink(missing_ok=True)
        for name in names:
            io.write_bytes_atomic(target / name, (folder / name).read_bytes())
        return str(target)
    remote = storage.RemoteFolder(dest)
    listing = remote.listing()
    if listing and MANIFEST not in listing:
        raise CurateError(f"{dest} holds objects q-curate did not write; push into an empty or new folder")
    with remote.locked():
        if MANIFEST in listing:  # uncommitted while the new files arrive; the old ones go
            earlier = json.loads(remote.fs.cat_file(f"{remote.root}/{MANIFEST}"))
            remote.fs.rm_file(f"{remote.root}/{MANIFEST}")
            for entry in earlier.get("files", []):
                if entry["name"] in listing and entry["name"] not in names:
                    remote.fs.rm_file(f"{remote.root}/{entry['name']}")
        for name in names:
            remote.fs.put_file(str(folder / name), f"{remote.root}/{name}")
    return dest
