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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, redact
from .errors import CurateError
from .schema import LOCK, MANIFEST, PRUNED_DATA, RUN_STAMP


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


def is_temporary(path: Path) -> bool:
    """A file `write_bytes_atomic` or `write_parquet_atomic` writes before renaming it (`.NAME.tmp-HOST-PID`)."""
    head, sep, tail = path.name.rpartition(".tmp-")
    return head.startswith(".") and bool(sep) and "-" in tail and tail.rsplit("-", 1)[1].isdigit()


def remove_temporaries(folder: Path) -> None:
    """Temporaries a killed writer left in `folder` itself, where q-curate writes: not below it, where a user's
    `.draft.tmp-1` is not ours to delete."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp-*"):
            if tmp.is_file() and is_temporary(tmp):
                tmp.unlink(missing_ok=True)


def outputs_matching(out: Path, outputs: tuple[str, ...]) -> list[Path]:
    """The files in OUT that match a stage's output patterns (a `folder/` pattern: everything under it)."""
    found = []
    for pattern in outputs:
        if pattern.endswith("/"):
            found += [p for folder in out.glob(pattern.rstrip("/")) if folder.is_dir() for p in folder.rglob("*")]
        else:
            found += out.glob(pattern)
    bookkeeping = {MANIFEST, RUN_STAMP, LOCK, LOCK + ".takeover"}
    return sorted(
        {p for p in found if (p.is_file() or p.is_symlink()) and p.name not in bookkeeping and not is_temporary(p)}
    )


def write_places(out: Path, outputs: tuple[str, ...]) -> list[Path]:
    """OUT and every folder below it that a stage writes files into (`data/`; for `seed-*/`, each one there)."""
    parents = {Path(p).parent for p in outputs if not p.endswith("/")}
    places = {place for parent in parents for place in (out.glob(str(parent)) if _wild(parent) else [out / parent])}
    return sorted(places)


def _wild(pattern: Path) -> bool:
    return any(c in str(pattern) for c in "*?[")


def files_in_write_places(out: Path, outputs: tuple[str, ...]) -> list[Path]:
    """Every file (temporaries aside) in the folders below OUT that a stage writes into (`data/`): they may hold
    only its own files, and the folders of the stages it runs there (the probe's `seed-S/scores/`)."""
    places = [p for p in write_places(out, outputs) if p != out and p.is_dir()]
    return sorted(
        f
        for place in places
        for f in place.rglob("*")
        if f.is_file() and not is_temporary(f) and not _in_stage_below(f, place)
    )


def _in_stage_below(path: Path, place: Path) -> bool:
    """Whether `path` is in a folder below `place` that a stage writes (it holds a manifest or a run stamp)."""
    below = [d for d in path.parents if d != place and d.is_relative_to(place)]
    return any((d / MANIFEST).exists() or (d / RUN_STAMP).exists() for d in below)


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


def _input_files(folder: Path) -> list[Path]:
    """The files under an input folder but those of q-curate's own output folders inside it (an --out within a
    `save_to_disk` folder must not change its input's identity, or every rerun would refuse)."""
    files = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        if here != folder and any(n in names for n in (MANIFEST, RUN_STAMP, LOCK)):
            dirs.clear()
            continue
        files += [here / n for n in names if (here / n).is_file()]
    return sorted(files)


def fingerprint_path(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else _input_files(path)
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def fingerprint_config(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- manifests


def record_path(folder: Path, path: str | Path) -> str:
    """A path as the manifest in `folder` records it: relative to `folder`, so that the run is found the same
    from any working directory, and still when the folders that hold it move together."""
    return os.path.relpath(Path(path).resolve(), folder.resolve())


def recorded_path(folder: Path, value: str) -> Path:
    """The path a manifest in `folder` recorded with `record_path` (absolute ones are taken as they are)."""
    return Path(value) if Path(value).is_absolute() else folder / value


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


def pruned_data_files(folder: Path, manifest: dict) -> list[Path]:
    """The training data a `prune` (or `retokenize`) manifest lists: its data/train-*.parquet shards, in order."""
    return [folder / f["name"] for f in manifest["files"] if f["name"].startswith(PRUNED_DATA + "/")]


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
    outputs = tuple(manifest.get("outputs", ()))  # the stage's output patterns, as it recorded them
    for path in sorted({*outputs_matching(folder, outputs), *files_in_write_places(folder, outputs)}):
        name = str(path.relative_to(folder))
        if name not in listed:
            problems.append((name, "not written by this run (stray file)"))
    return problems


# The kind of output of a manifest written before manifests named it (q-curate < 0.1 of 2026-12).
LEGACY_KINDS = {
    "score": "scores",
    "prune": "pruned",
    "retokenize": "pruned",
    "train": "model",
    "train-command": "model",
}


def manifest_kind(manifest: dict) -> str:
    """What a finished stage produced (scores, pruned, model...): what a consumer asks for, whichever stage made it."""
    return manifest.get("kind") or LEGACY_KINDS.get(manifest["stage"], manifest["stage"])


def verified(folder: Path, kind: str | tuple[str, ...], hint: str) -> dict:
    """The manifest of `folder` after checking that a run producing `kind` (or one of several) finished there and its
    files are intact."""
    if not folder.is_dir():
        raise CurateError(f"{folder}: no such folder ({hint})")
    manifest = read_manifest(folder)
    if manifest is None:
        raise CurateError(f"{folder}: no {MANIFEST}, so the run there is unfinished or never started ({hint})")
    kinds = (kind,) if isinstance(kind, str) else kind
    if manifest_kind(manifest) not in kinds:
        raise CurateError(
            f"{folder} holds the output of `curate {manifest['stage']}` ({manifest_kind(manifest)}), not "
            f"{' or '.join(kinds)} ({hint})"
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


def pid_alive(pid: int) -> bool:
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
        "command": redact.command_line(),
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
            elif holder["host"] == me["host"] and _ancestor(holder["pid"]):
                # a command the holder started for this folder (refresh's --train-cmd running `curate train`)
                yield
                return
            elif holder["host"] != me["host"] or pid_alive(holder["pid"]):
                raise CurateError(
                    f"{folder} is in use by process {holder['pid']} on {holder['host']} since "
                    f"{holder.get('since')} ({redact.text(str(holder.get('command', '')))}); wait for it to finish, or "
                    f"delete {path} if that process is gone"
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


def _ancestor(pid: int) -> bool:
    """Whether `pid` started this process (directly or through a shell)."""
    current = os.getppid()
    while current > 1:
        if current == pid:
            return True
        try:
            current = int(Path(f"/proc/{current}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


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


def resolved(path: Path) -> Path:
    """`path.resolve()`, where a symbolic link loop on the way is a clear error naming it (Python before 3.13
    raises a RuntimeError there)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise CurateError(
            f"{path}: a symbolic link loop (a link that leads back to itself); remove it or choose another path"
        ) from None


def same_folder(a: Path, b: Path) -> bool:
    return resolved(a) == resolved(b)
