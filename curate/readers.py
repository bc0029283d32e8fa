"""Raw input rows, read by ranges: JSONL, JSON arrays, Parquet and `datasets` save_to_disk folders.

An input is a `Source`: one data file, a folder of data files laid out as a Hub dataset repo (its card's
`configs:` pick the files of a subset and split; else `data/train-*` and the like), a glob, or a comma-separated
list, each local or at an fsspec URL (`hf://datasets/ORG/NAME`, `s3://...`). Remote files are read by ranges:
a Parquet shard fetches only its row groups, a JSONL shard only its bytes (the planner reads a JSONL file once, to
find where each shard begins).

A scoring run is cut into shards of consecutive input rows (`plan`), and each shard reads only its own rows
(`read_range`), so any process (a Ray actor on another machine included) can read, convert and tokenise its
shard without the others. A row that cannot be read or decoded comes back as a RowError in its place, so one
bad row never stops a file.
"""

from __future__ import annotations

import glob as globbing
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from . import storage
from .errors import CurateError, RowError

BOM = b"\xef\xbb\xbf"
LINE_CAP = 1 << 30  # the most of one JSONL line ever held in memory, whatever --max-row-bytes says
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATA_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet")
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of the input (counting rows, not lines); for JSONL also where row `start` begins."""

    index: int
    start: int
    stop: int
    offset: int = 0  # JSONL: byte offset of row `start`
    line: int = 1  # JSONL: its 1-based line number
    file: int = 0  # which of the source's files (rows are counted per file)


@dataclass(frozen=True)
class Source:
    """What a scoring run reads: its data files in order (paths or URLs), and how they were chosen."""

    given: str
    files: tuple[str, ...]
    split: str | None = None
    subset: str | None = None
    revision: str | None = None  # a Hub dataset's commit, which `files` are read at

    def __str__(self) -> str:
        return self.given

    def entry(self) -> dict:
        """The source as a manifest records it (the files pin it; a Hub URL's files carry their revision)."""
        return {
            "given": self.given,
            "split": self.split,
            "subset": self.subset,
            "files": list(self.files),
            **({"revision": self.revision} if self.revision else {}),
        }


def as_source(value: Source | str | Path) -> Source:
    return value if isinstance(value, Source) else Source(str(value), (str(value),))


def resolve(given: str | Path, split: str | None = None, subset: str | None = None) -> Source:
    """The data files of an input: a file, a comma-separated list, a glob, a save_to_disk folder, or a folder laid
    out as a Hub dataset repo (card `configs:` for `subset` and `split`, else the Hub's default file names)."""
    given = str(given)
    pinned, revision = storage.pin_hub_revision(given)
    if revision:
        return replace(resolve(pinned, split, subset), given=given, revision=revision)
    if "," in given and not storage.exists(given):
        files = [f for part in given.split(",") if part.strip() for f in resolve(part.strip(), split, subset).files]
        return Source(given, tuple(files), split, subset)
    if any(c in given.split("://")[-1] for c in "*?["):
        files = _glob(given)
        if not files:
            raise CurateError(f"{given}: the pattern matches no file")
        return Source(given, tuple(files), split, subset)
    if not storage.exists(given):
        raise CurateError(f"{given}: no such file or folder")
    if not storage.is_dir(given) or any(storage.exists(storage.join(given, m)) for m in SAVE_TO_DISK_MARKERS):
        if split or subset:
            raise CurateError(f"{given}: --split and --subset choose files in a dataset folder; this is one file")
        return Source(given, (given,))
    return Source(given, tuple(_hub_files(given, split, subset)), split, subset)


def is_many_or_remote(given: str | Path) -> bool:
    """Whether an input is more than one local path: a URL, a glob or a comma-separated list."""
    text = str(given)
    return storage.is_url(text) or any(c in text for c in "*?[") or ("," in text and not storage.exists(text))


def fingerprint(given: str) -> str:
    """The identity of a URL, glob or list input: its files' names and contents (remote ones by the ETags or
    checksums the store keeps, never downloaded for this)."""
    import hashlib

    from .io import fingerprint_path

    if storage.is_url(given) and not any(c in given for c in "*?[,"):
        return storage.fingerprint(given)
    h = hashlib.sha256()
    for f in resolve(given).files:
        h.update(
            f"{PurePosixPath(f).name}\0"  # names, not where they were named from: the same files are the same input
            f"{storage.fingerprint(f) if storage.is_url(f) else fingerprint_path(storage.local(f))}\0".encode()
        )
    return h.hexdigest()[:16]


def _hub_files(root: str, split: str | None, subset: str | None) -> list[str]:
    """The data files of one subset and split of a Hub-layout folder (`datasets`' own rules, in short)."""
    configs = _card_configs(root)
    if configs:
        names = [c.get("config_name", "default") for c in configs]
        chosen = subset or ("default" if "default" in names else names[0])
        if chosen not in names:
            raise CurateError(f"{root}: no subset {chosen!r} (its card names {', '.join(names)}); use --subset")
        data_files = configs[names.index(chosen)].get("data_files", [])
        if isinstance(data_files, (str, list)) and not (data_files and isinstance(data_files[0], dict)):
            data_files = [{"split": "train", "path": data_files}]
        splits = {d.get("split", "train"): d.get("path") for d in data_files if isinstance(d, dict)}
        wanted = split or ("train" if "train" in splits else next(iter(splits), "train"))
        if wanted not in splits:
            raise CurateError(f"{root}: subset {chosen!r} has no split {wanted!r} (it has {', '.join(splits)})")
        patterns = splits[wanted] if isinstance(splits[wanted], list) else [splits[wanted]]
        card = storage.join(root, "README.md")
        files = _inside(root, sorted({f for p in patterns for f in _glob(storage.join(root, p))}), card)
        if not files:
            raise CurateError(f"{root}: the card's files for {chosen}/{wanted} ({', '.join(patterns)}) are not there")
        return files
    if subset:
        raise CurateError(f"{root}: --subset {subset}, but the folder's card (README.md) declares no configs")
    wanted = split or "train"
    for pattern in (
        f"data/{wanted}-*",
        f"data/{wanted}.*",
        f"{wanted}/*",
        f"{wanted}-*",
        f"{wanted}.*",
        f"*/{wanted}-*",
    ):
        files = [f for f in _glob(storage.join(root, pattern)) if f.lower().endswith(DATA_SUFFIXES)]
        if files:
            return files
    everything = [f for f in _glob(storage.join(root, "**")) if f.lower().endswith(DATA_SUFFIXES)]
    if split or not everything:
        raise CurateError(
            f"{root}: no data files for split {wanted!r} (looked for data/{wanted}-*.parquet and the like; "
            "a `datasets` save_to_disk folder needs its dataset_info.json)"
        )
    return everything


def _card_configs(root: str) -> list[dict]:
    """The card's `configs`, each checked for the shapes `datasets` reads (names and paths are text)."""
    from .card import front_matter

    card = storage.join(root, "README.md")
    text = storage.read_text(card) if storage.exists(card) else None
    configs = front_matter(text, card).get("configs")
    if configs is None:
        return []
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise CurateError(f"{card}: the card's `configs` must be a list of mappings")
    for c in configs:
        name, files = c.get("config_name", "default"), c.get("data_files", [])
        entries = files if isinstance(files, list) else [files]
        paths = [p for e in entries for p in (e.get("path") if isinstance(e, dict) else e,)]
        paths = [q for p in paths for q in (p if isinstance(p, list) else [p])]
        if not isinstance(name, str) or not all(isinstance(p, str) for p in paths):
            raise CurateError(f"{card}: config {name!r}: config_name and data file paths must be text")
        for p in paths:
            if p.startswith("/") or "://" in p or ".." in PurePosixPath(p).parts:
                raise CurateError(
                    f"{card}: config {name!r} names the data file {p!r}, outside the dataset folder; a card's data "
                    "files are paths inside its folder"
                )
    return configs


def _inside(root: str, files: list[str], card: str) -> list[str]:
    """`files` if each lies inside `root` (symlinks resolved for local folders), else an error naming the first."""
    base = storage.local(root).resolve() if not storage.is_url(root) else None
    prefix = posixpath.normpath(str(root).split("://", 1)[-1]) + "/"
    for f in files:
        if base is not None:
            inside = base in storage.local(f).resolve().parents
        else:
            inside = posixpath.normpath(f.split("://", 1)[-1]).startswith(prefix)
        if not inside:
            raise CurateError(f"{card}: the data file {f} lies outside the dataset folder {root}; refused")
    return files


def _glob(pattern: str) -> list[str]:
    if storage.is_url(pattern):
        fs, path = storage.filesystem(pattern)
        protocol = pattern.split("://", 1)[0]
        return sorted(f"{protocol}://{p.removeprefix(protocol + '://')}" for p in fs.glob(path) if fs.isfile(p))
    return sorted(p for p in globbing.glob(str(storage.local(pattern)), recursive=True) if Path(p).is_file())


def kind(path: str | Path) -> str:
    loc = str(path)
    if not storage.exists(loc):
        raise CurateError(f"{loc}: no such file or folder")
    if storage.is_dir(loc):
        if storage.is_url(loc):
            raise CurateError(f"{loc}: a save_to_disk folder is read from a local disk; give its data files instead")
        return "datasets"
    suffix = PurePosixPath(loc).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        with storage.open_input(loc) as f:
            head = f.read(4096).removeprefix(BOM).lstrip()
        return "json-array" if head.startswith(b"[") else "jsonl"
    raise CurateError(f"{loc}: unsupported input type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk folder")


# ---------------------------------------------------------------- planning


def plan(source: Source | str | Path, shard_rows: int, limit: int | None = None) -> list[RowRange]:
    """The shards of a scoring run: consecutive ranges of `shard_rows` rows of each file, in order (the first
    `limit` rows of the source)."""
    ranges: list[RowRange] = []
    for f, loc in enumerate(as_source(source).files):
        left = None if limit is None else limit - sum(r.stop - r.start for r in ranges)
        if left == 0:
            break
        ranges += [replace(r, index=len(ranges) + i, file=f) for i, r in enumerate(_plan_file(loc, shard_rows, left))]
    return ranges


def _plan_file(path: str, shard_rows: int, limit: int | None) -> list[RowRange]:
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


def _plan_jsonl(path: str, shard_rows: int, limit: int | None) -> list[RowRange]:
    starts: list[tuple[int, int]] = []  # (byte offset, line number) of each shard's first row
    rows, offset = 0, 0
    with storage.open_input(path) as f:
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


def count_rows(path: str | Path) -> int:
    k = kind(path)
    if k == "jsonl":
        with storage.open_input(path) as f:
            return sum(1 for line, _ in _lines(f) if _is_row(line))
    if k == "parquet":
        return _parquet(path).metadata.num_rows
    if k == "json-array":
        return len(_json_array(path))
    return len(_dataset(path))


# ---------------------------------------------------------------- reading


def read_range(
    source: Source | str | Path, rows: RowRange, max_row_bytes: int | None = None
) -> Iterator[tuple[int, Any]]:
    """(row number, record or RowError) for every row of the range. Row numbers are 1-based line numbers for
    JSONL and 0-based indices for JSON arrays, Parquet and datasets folders, counted in the range's file. A row
    above `max_row_bytes` is a RowError (`row_too_large`): a JSONL line is measured before it is parsed, other
    rows by their text."""
    path = file_of(source, rows)
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


def file_of(source: Source | str | Path, rows: RowRange) -> str:
    """The file a range's rows are in."""
    return as_source(source).files[rows.file]


def head(source: Source | str | Path, n: int) -> list[Any]:
    """The first `n` records (RowErrors left out), for format detection."""
    first = plan(source, n, n)
    return [rec for _, rec in read_range(source, first[0]) if not isinstance(rec, RowError)] if first else []


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return RowError("invalid_json", "invalid JSON: nested too deeply to read")


def _read_jsonl(path: str, rows: RowRange, max_row_bytes: int | None) -> Iterator[tuple[int, Any]]:
    wanted = rows.stop - rows.start
    cap = min(LINE_CAP, max_row_bytes) if max_row_bytes else LINE_CAP
    with storage.open_input(path) as f:
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


def _cached(path: str, what: str, load):
    """One loaded input per process (a worker reads many shards of the same file)."""
    if storage.is_url(path):
        key = (path, storage.tag(path), what)
    else:
        st = storage.local(path).stat()
        key = (str(storage.local(path).resolve()), st.st_mtime_ns, st.st_size, what)
    if key not in _cache:
        _cache.clear()
        _cache[key] = load()
    return _cache[key]


def _json_array(path: str) -> list:
    """A JSON array as a list of thunks, one per element: each returns the element or its RowError."""

    def load():
        # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its string, which the row's
        # own checks report (invalid_unicode), instead of failing the whole file.
        with storage.open_input(path) as f:
            raw = f.read()
        text = raw.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return [(lambda s=s: parse_json(s)) for s in _split_array(path, text)]
        if not isinstance(data, list):
            raise CurateError(f"{path}: expected a JSON array of rows")
        return [(lambda r=r: r) for r in data]

    return _cached(path, "json", load)


def _split_array(path: str, text: str) -> list[str]:
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


def _parquet(path: str):
    """The Parquet file, open (a remote one stays open, so each row group read is a ranged request)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def load():
        try:
            return pq.ParquetFile(
                storage.open_input(path, buffered=False) if storage.is_url(path) else storage.local(path)
            )
        except (OSError, pa.ArrowException) as e:
            raise CurateError(f"{path}: not a readable Parquet file ({e})") from None

    return _cached(path, "parquet", load)


def _read_parquet(path: str, rows: RowRange) -> Iterator[tuple[int, Any]]:
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


def _dataset(path: str):
    from .extras import require

    require("datasets", purpose=f"reading the save_to_disk folder {path}")
    import datasets

    def load():
        try:
            ds = datasets.load_from_disk(str(storage.local(path)))
        except Exception as e:  # datasets raises many types; the user needs the path and the reason
            raise CurateError(f"{path}: not a `datasets` save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CurateError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds

    return _cached(path, "datasets", load)
