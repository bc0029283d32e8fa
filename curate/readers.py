"""Raw input rows, read by ranges: JSONL, JSON arrays, Parquet and `datasets` save_to_disk folders.

A scoring run is cut into shards of consecutive input rows (`plan`), and each shard reads only its own rows
(`read_range`), so any process (a Ray actor on another machine included) can read, convert and tokenise its
shard without the others. A row that cannot be read or decoded comes back as a RowError in its place, so one
bad row never stops a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CurateError, RowError

BOM = b"\xef\xbb\xbf"
LINE_CAP = 1 << 30  # the most of one JSONL line ever held in memory, whatever --max-row-bytes says
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of the input (counting rows, not lines); for JSONL also where row `start` begins."""

    index: int
    start: int
    stop: int
    offset: int = 0  # JSONL: byte offset of row `start`
    line: int = 1  # JSONL: its 1-based line number


def kind(path: Path) -> str:
    if not path.exists():
        raise CurateError(f"{path}: no such file or folder")
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(BOM).lstrip()
        return "json-array" if head.startswith(b"[") else "jsonl"
    raise CurateError(
        f"{path}: unsupported input type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk folder"
    )


# ---------------------------------------------------------------- planning


def plan(path: Path, shard_rows: int, limit: int | None = None) -> list[RowRange]:
    """The shards of a scoring run: consecutive ranges of `shard_rows` input rows (the first `limit` rows)."""
    k = kind(path)
    if k == "jsonl":
        return _plan_jsonl(path, shard_rows, limit)
    total = count_rows(path)
    if limit is not None:
        total = min(total, limit)
    return [RowRange(i, start, min(start + shard_rows, total)) for i, start in enumerate(range(0, total, shard_rows))]


def _lines(f, cap: int = LINE_CAP) -> Iterator[tuple[bytes | None, int]]:
    """(line, its size in bytes) for each line of a binary file; a line longer than `cap` comes back as
    (None, size) without ever being held in memory whole (a 50 MB row must not cost gigabytes)."""
    while line := f.readline(cap + 1):
        size = len(line)
        if size > cap and not line.endswith(b"\n"):
            while rest := f.readline(1 << 20):
                size += len(rest)
                if rest.endswith(b"\n"):
                    break
            yield None, size
        else:
            yield line, size


def _is_row(line: bytes | None) -> bool:
    return line is None or bool(line.strip() and line.strip() != BOM)


def _plan_jsonl(path: Path, shard_rows: int, limit: int | None) -> list[RowRange]:
    starts: list[tuple[int, int]] = []  # (byte offset, line number) of each shard's first row
    rows, offset = 0, 0
    with open(path, "rb") as f:
        for lineno, (line, size) in enumerate(_lines(f), start=1):
            if limit is not None and rows >= limit:
                break
            if _is_row(line):
                if rows % shard_rows == 0:
                    starts.append((offset, lineno))
                rows += 1
            offset += size
    return [
        RowRange(i, i * shard_rows, min((i + 1) * shard_rows, rows), off, line) for i, (off, line) in enumerate(starts)
    ]


def count_rows(path: Path) -> int:
    k = kind(path)
    if k == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line, _ in _lines(f) if _is_row(line))
    if k == "parquet":
        return _parquet(path).metadata.num_rows
    if k == "json-array":
        return len(_json_array(path))
    return len(_dataset(path))


# ---------------------------------------------------------------- reading


def read_range(path: Path, rows: RowRange, max_row_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, record or RowError) for every row of the range. Row numbers are 1-based line numbers for
    JSONL and 0-based indices for JSON arrays, Parquet and datasets folders. A row above `max_row_bytes` is a
    RowError (`row_too_large`): a JSONL line is measured before it is parsed, other rows by their text."""
    k = kind(path)
    if k == "jsonl":
        yield from _read_jsonl(path, rows, max_row_bytes)
        return
    if k == "json-array":
        elements = _json_array(path)
        records = ((i, elements[i]()) for i in range(rows.start, rows.stop))
    elif k == "parquet":
        records = _read_parquet(path, rows)
    else:
        ds = _dataset(path)
        records = ((i, ds[i]) for i in range(rows.start, rows.stop))
    for i, record in records:
        size = text_bytes(record) if max_row_bytes else 0
        yield i, too_large(size, max_row_bytes) if size > (max_row_bytes or 0) else record


def too_large(size: int, limit: int) -> RowError:
    return RowError("row_too_large", f"the row holds {size:,} bytes, above --max-row-bytes {limit:,}; skipped unread")


def text_bytes(record: Any) -> int:
    """The UTF-8 size of the text in a decoded row (strings only), counted without copying it."""
    if isinstance(record, str):
        return len(record) if record.isascii() else len(record.encode("utf-8", "surrogatepass"))
    if isinstance(record, dict):
        return sum(text_bytes(v) for v in record.values())
    if isinstance(record, list):
        return sum(text_bytes(v) for v in record)
    return 0


def head(path: Path, n: int) -> list[Any]:
    """The first `n` records (RowErrors left out), for format detection."""
    first = plan(path, n, n)
    return [rec for _, rec in read_range(path, first[0]) if not isinstance(rec, RowError)] if first else []


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return RowError("invalid_json", "invalid JSON: nested too deeply to read")


def _read_jsonl(path: Path, rows: RowRange, max_row_bytes: int | None) -> Iterator[tuple[int, Any]]:
    wanted = rows.stop - rows.start
    cap = min(LINE_CAP, max_row_bytes) if max_row_bytes else LINE_CAP
    with open(path, "rb") as f:
        f.seek(rows.offset)
        for lineno, (line, size) in enumerate(_lines(f, cap), start=rows.line):
            if wanted == 0:
                return
            if line is None:
                wanted -= 1
                yield lineno, too_large(size, cap)
                continue
            if lineno == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            wanted -= 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    lineno,
                    RowError("invalid_utf8", f"byte {line[e.start]:#04x} at column {e.start + 1} is not UTF-8"),
                )
                continue
            yield lineno, parse_json(text)


_cache: dict[tuple, Any] = {}


def _cached(path: Path, what: str, load):
    """One loaded input per process (a worker reads many shards of the same file)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, what)
    if key not in _cache:
        _cache.clear()
        _cache[key] = load()
    return _cache[key]


def _json_array(path: Path) -> list:
    """A JSON array as a list of thunks, one per element: each returns the element or its RowError."""

    def load():
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its string, which the row's
        # own checks report (invalid_unicode), instead of failing the whole file.
        text = path.read_bytes().removeprefix(BOM).decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return [(lambda s=s: parse_json(s)) for s in _split_array(path, text)]
        if not isinstance(data, list):
            raise CurateError(f"{path}: expected a JSON array of rows")
        return [(lambda r=r: r) for r in data]

    return _cached(path, "json", load)


def _split_array(path: Path, text: str) -> list[str]:
    """The elements of a JSON array as text, by bracket matching, so that one bad element is one bad row."""
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise CurateError(f"{path}: not a JSON array")
    elements, depth, start, in_string, escaped = [], 0, i + 1, False, False
    for j in range(i + 1, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:  # the array's own closing bracket
                if text[start:j].strip():
                    elements.append(text[start:j])
                return elements
            depth -= 1
        elif c == "," and depth == 0:
            elements.append(text[start:j])
            start = j + 1
    raise CurateError(f"{path}: the JSON array is not closed (the file is truncated?)")


def _parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise CurateError(f"{path}: not a readable Parquet file ({e})") from None


def _read_parquet(path: Path, rows: RowRange) -> Iterator[tuple[int, Any]]:
    pf = _parquet(path)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(rows.start, first), min(rows.stop, first + n)
        if lo < hi:
            table = pf.read_row_group(g).slice(lo - first, hi - lo)
            yield from enumerate(table.to_pylist(), start=lo)
        first += n
        if first >= rows.stop:
            return


def _dataset(path: Path):
    from .extras import require

    require("datasets", purpose=f"reading the save_to_disk folder {path}")
    import datasets

    def load():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types; the user needs the path and the reason
            raise CurateError(f"{path}: not a `datasets` save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CurateError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds

    return _cached(path, "datasets", load)
