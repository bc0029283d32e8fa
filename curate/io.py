"""Files on disk: atomic writes, Parquet shards, manifests and fingerprints.

Every stage writes its shards with an atomic rename, so a shard that exists is complete, and its
`_manifest.json` last, so a manifest that exists means the stage finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .errors import CurateError

MANIFEST = "_manifest.json"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def parquet_metadata(path: Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW")}


def fingerprint_path(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names, sizes and bytes)."""
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


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(out_dir: Path, stage: str, fingerprint: str, started: float, **fields: Any) -> dict:
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "curate_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        **fields,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def is_done(out_dir: Path, fingerprint: str) -> dict | None:
    """The finished manifest when `out_dir` holds a completed run with exactly this fingerprint."""
    manifest = read_manifest(out_dir)
    if manifest and manifest.get("fingerprint") == fingerprint:
        return manifest
    return None


def pruned_data_files(path: Path) -> list[Path]:
    """The Parquet files of a pruned dataset: DIR/data/*.parquet, DIR/*.parquet, or the file itself."""
    if path.is_file():
        return [path]
    for folder in (path / "data", path):
        files = sorted(folder.glob("*.parquet"))
        if files:
            return files
    raise CurateError(f"{path}: no Parquet files found (expected a `curate prune` output folder with data/*.parquet)")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.parquet"
