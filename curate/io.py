"""Files on disk: atomic writes, manifests with checksums, verification, fingerprints and folder locks.

Every file a stage writes appears under its final name only when complete (written beside it, then renamed),
and the stage's `_manifest.json` comes last and lists every output with its size and checksum. A downstream
stage trusts nothing else: it reads a folder only through `verified`, which checks the stage kind, the file
list (nothing missing, nothing stray) and every checksum, and names the file that fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .errors import CurateError
from .schema import LOCK, MANIFEST

# Output files of each stage that must all be listed in its manifest (anything else matching is stray).
STAGE_GLOBS = {"score": ("part-*.parquet",), "prune": ("data/*.parquet",)}


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CurateError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CurateError(f"{path}: not valid JSON ({e}); the file is damaged: rerun the stage that wrote it") from None


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, Any] | None = None) -> None:
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parquet_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata of a Parquet file; raises CurateError naming the file when it is not readable."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise CurateError(f"{path}: not a readable Parquet file ({e})") from None
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}


def remove_temporaries(folder: Path) -> None:
    """Files a killed writer left beside their targets (`.NAME.tmp-HOST-PID`)."""
    for tmp in folder.rglob(".*.tmp-*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- fingerprints and checksums


def checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, name: str, **extra: Any) -> dict:
    path = root / name
    return {"name": name, "bytes": path.stat().st_size, "blake2b": checksum(path), **extra}


def fingerprint_path(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def fingerprint_config(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- manifests


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a finished stage, None when there is none; a damaged one is an error."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or "stage" not in manifest or "fingerprint" not in manifest:
        raise CurateError(f"{path}: not a q-curate manifest; rerun the stage that wrote {folder} (with --force)")
    return manifest


def write_manifest(
    out: Path, stage: str, fingerprint: str, started: float, files: list[dict] | None = None, **fields: Any
) -> dict:
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "curate_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        "files": files or [],
        **fields,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def file_problems(folder: Path, manifest: dict) -> list[tuple[str, str]]:
    """(file, what is wrong) for every listed output that is missing, resized or changed, and every stray one."""
    problems = []
    listed = set()
    for entry in manifest.get("files", []):
        listed.add(entry["name"])
        path = folder / entry["name"]
        if not path.is_file():
            problems.append((entry["name"], "missing"))
        elif path.stat().st_size != entry["bytes"]:
            problems.append((entry["name"], f"size {path.stat().st_size} bytes, the manifest says {entry['bytes']}"))
        elif checksum(path) != entry["blake2b"]:
            problems.append((entry["name"], "checksum differs from the manifest (the file was changed or damaged)"))
    for pattern in STAGE_GLOBS.get(manifest["stage"], ()):
        for path in sorted(folder.glob(pattern)):
            name = str(path.relative_to(folder))
            if name not in listed:
                problems.append((name, "not written by this run (stray file)"))
    return problems


def verified(folder: Path, stage: str | tuple[str, ...], hint: str) -> dict:
    """The manifest of `folder` after checking that a `stage` run finished there and its files are intact."""
    stages = (stage,) if isinstance(stage, str) else stage
    if not folder.is_dir():
        raise CurateError(f"{folder}: no such folder ({hint})")
    manifest = read_manifest(folder)
    if manifest is None:
        raise CurateError(
            f"{folder}: no {MANIFEST}, so the {'/'.join(stages)} run there is unfinished or never started ({hint})"
        )
    if manifest["stage"] not in stages:
        raise CurateError(
            f"{folder} holds the output of `curate {manifest['stage']}`, not of `curate {'/'.join(stages)}` ({hint})"
        )
    problems = file_problems(folder, manifest)
    if problems:
        name, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CurateError(
            f"{folder / name}: {what}{more}; `curate verify {folder}` lists them; rerun the stage "
            f"that wrote {folder} to repair it"
        )
    return manifest


# ---------------------------------------------------------------- locks

_held: dict[Path, int] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def locked(folder: Path, log=lambda msg: None) -> Iterator[None]:
    """Hold `folder/.curate.lock` (pid and host inside) for the duration; a lock of a dead process on this
    host is taken over with a warning, a live one is an error naming its holder. Re-entrant in one process."""
    folder = folder.resolve()
    if _held.get(folder):
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if not holder:  # being written this instant, or left empty or malformed by a crash: give it a moment
                time.sleep(0.2)
                if path.exists() and time.time() - _mtime(path) < 5:
                    continue
            elif holder["host"] != me["host"] or _alive(holder["pid"]):
                raise CurateError(
                    f"{folder} is in use by process {holder['pid']} on {holder['host']} since "
                    f"{holder.get('since')} ({holder.get('command', '')}); wait for it to finish, or delete "
                    f"{path} if that process is gone"
                ) from None
            _take_over(path, holder, log)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    _held[folder] = 1
    try:
        yield
    finally:
        _held.pop(folder, None)
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def _lock_holder(path: Path) -> dict:
    """The lock's holder ({pid: int, host: str, ...}), or {} when the file is gone, empty or not one of ours."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    pid, host = (holder.get("pid"), holder.get("host")) if isinstance(holder, dict) else (None, None)
    if not isinstance(pid, int) or pid <= 0 or not isinstance(host, str):
        return {}
    return holder


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _take_over(path: Path, holder: dict, log) -> None:
    """Remove the lock of a dead holder, one process at a time: two processes that both found the same dead
    holder must not both take the folder (the second would delete the first one's fresh lock). A guard file
    serialises them, and the lock is removed only if it still names the dead holder."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if time.time() - _mtime(guard) > 10:  # left by a process killed in these few lines
            guard.unlink(missing_ok=True)
        time.sleep(0.05)
        return
    try:
        if _lock_holder(path) == holder or not path.exists():
            who = f"process {holder['pid']} that held it is gone" if holder else "it is empty or malformed"
            log(f"warning: taking over {path}: {who}")
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()
