"""Where data lives: local paths and fsspec URLs (`s3://`, `gs://`, `hf://`, `memory://`, `file://`).

Every stage computes on a local folder; a URL output is a `RemoteFolder`: a working copy in the user cache
(`~/.cache/q-curate/staging/...`) kept in step with the bucket. Before a run it is made an exact copy of what the
bucket holds (files already there and unchanged are not downloaded again); during the run each finished file is
uploaded as one object (an object appears whole or not at all: no rename is needed); at the end the manifest is
uploaded last, and it is what commits the run, as it does on a local disk. So every local guarantee (resume,
verification, clearing only our own files) holds on a bucket by the same code.

Credentials and endpoints come from where fsspec looks (environment, fsspec config) and from
`--storage-options` (JSON, per protocol or for all), passed on in the environment variable CURATE_STORAGE_OPTIONS:
never in a config, a manifest or a log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import redact
from .errors import CurateError
from .schema import LOCK, MANIFEST

OPTIONS_ENV = "CURATE_STORAGE_OPTIONS"
READ_BLOCK = 4 << 20  # bytes per ranged request when reading lines from a remote file
HEARTBEAT_S = 15.0  # a lock object's holder rewrites it this often
STALE_S = 120.0  # a lock object not rewritten for this long belongs to a run that is gone


def is_url(value: str | Path | None) -> bool:
    """Whether `value` names something fsspec reaches, other than a plain local path (`file://` is local)."""
    text = str(value or "")
    return "://" in text and not text.startswith("file://")


def local(value: str | Path) -> Path:
    """A local path given plainly or as `file://`."""
    text = str(value)
    return Path(text.removeprefix("file://")).expanduser()


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URL (never through Path, which would fold `s3://` into `s3:/`) or a path."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local(base), *parts))


def resolve(base: str | Path, recorded: str) -> str | Path:
    """A path a manifest in `base` recorded: URLs and absolute paths as they are, relative ones against `base`
    (a URL base stays a URL: `s3://b/run/pruned` + `../scores` is `s3://b/run/scores`)."""
    if is_url(recorded) or Path(recorded).is_absolute():
        return recorded
    if is_url(base):
        scheme, rest = str(base).split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, recorded))}"
    return local(base) / recorded


def materialized(location: str | Path, log=lambda msg: None) -> Path:
    """A folder to read locally: a path as it is, a URL as its working copy (fetched as needed)."""
    return RemoteFolder(str(location)).pull(log) if is_url(location) else local(location)


def options(protocol: str) -> dict:
    """The storage options for `protocol` from CURATE_STORAGE_OPTIONS: `{"s3": {...}}` per protocol, or a flat
    object for all."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CurateError(f"--storage-options is not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(opts, dict):
        raise CurateError("--storage-options must be a JSON object")
    nested = {k: v for k, v in opts.items() if isinstance(v, dict) and k.isalnum() and k.islower()}
    if nested and len(nested) == len(opts):
        return dict(opts.get(protocol, {}))
    return opts


def set_options(text: str | None) -> None:
    """`--storage-options`: checked now, then passed to every stage and worker (Ray ones too) by the environment,
    never on a command line. `@FILE` reads the JSON from a file, so that no secret is in this process's own
    command line either (which `ps` shows every user of the machine)."""
    if text and text.startswith("@"):
        try:
            text = Path(text[1:]).expanduser().read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise CurateError(f"--storage-options {text}: cannot read {text[1:]} ({e.strerror})") from None
        except UnicodeDecodeError as e:  # the position only: the bytes may be a secret
            raise CurateError(
                f"--storage-options {text}: {text[1:]} is not UTF-8 text (byte {e.start}); save the JSON as UTF-8"
            ) from None
    if text:
        os.environ[OPTIONS_ENV] = text
        options("")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL, with a clear error when its protocol is not installed."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, **options(protocol))
    except ImportError as e:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}.get(protocol)
        hint = f"pip install 'q-curate[{extra}]'" if extra else "install the fsspec package for it"
        raise CurateError(f"{url}: {protocol}:// needs a package that is not installed ({e}): {hint}") from None
    except ValueError as e:
        raise CurateError(f"{url}: {e}") from None
    return fs, path


def cache_dir() -> Path:
    """q-curate's cache: CURATE_CACHE, else ~/.cache/q-curate (converted models, digests, working copies)."""
    root = os.environ.get("CURATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "q-curate"
    )
    return Path(root)


def staging_dir(url: str) -> Path:
    """The local working copy of a remote folder: in the user cache, one per URL (the same on every node)."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    path = cache_dir() / "staging" / f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1][:40]}"
    _TYPED[str(path)] = url.rstrip("/")
    return path


_TYPED: dict[str, str] = {}  # working copy -> the URL it stands in for, in this process


def as_typed(text: str) -> str:
    """A message with every working copy this process used replaced by the URL the user typed: errors and
    summaries name what the user knows, not a folder in the cache."""
    for path in sorted(_TYPED, key=len, reverse=True):
        text = text.replace(path, _TYPED[path])
    return text


def open_input(path: str | Path, buffered: bool = True):
    """A binary file object for reading a local path or a URL (remote reads fetch only the ranges read). Buffered,
    it has the full `readline(size)` that reading one capped JSONL line needs; Parquet takes the raw one."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, inner = filesystem(str(path))
    try:
        # Parquet asks for exactly the byte ranges it needs (footer, column chunks): no read-ahead; lines are
        # read in 4 MiB blocks (s3fs would fetch 50 MiB at a time, many shards' worth of a JSONL file).
        f = fs.open(inner, "rb", block_size=READ_BLOCK, cache_type="readahead" if buffered else "none")
    except FileNotFoundError:
        raise CurateError(f"{path}: no such object") from None
    return io.BufferedReader(f, buffer_size=1 << 20) if buffered else f


def exists(loc: str | Path) -> bool:
    if is_url(loc):
        fs, path = filesystem(str(loc))
        return fs.exists(path)
    return local(loc).exists()


def is_dir(loc: str | Path) -> bool:
    if is_url(loc):
        fs, path = filesystem(str(loc))
        return fs.isdir(path)
    return local(loc).is_dir()


def parent(loc: str | Path) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[0] if is_url(loc) else str(local(loc).parent)


def read_text(loc: str | Path) -> str | None:
    """A small text file's contents (a dataset card), or None when it is not there or not text."""
    try:
        with open_input(loc) as f:
            return f.read().decode("utf-8")
    except (OSError, CurateError, UnicodeDecodeError):
        return None


class RemoteFolder:
    """A folder at a URL and its working copy in the cache (see the module's docstring)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.local = staging_dir(self.url)
        self._index_path = self.local.with_name(self.local.name + ".index.json")

    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, dict]:
        """name -> object info of every object under the folder (the lock aside)."""
        self.fs.invalidate_cache(self.root)  # other processes (workers, other runs) write here too
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():  # the store has no such bucket: not an empty folder
                raise CurateError(f"{self.url}: {' '.join(str(e).split())}") from None
            return {}
        listing = {}
        for path, info in found.items():
            name = path[len(self.root) + 1 :] if path.startswith(self.root + "/") else None
            if name and info.get("type", "file") == "file" and name.split("/")[-1] not in (LOCK, LOCK + ".takeover"):
                listing[name] = info
        return listing

    def exists(self) -> bool:
        return bool(self.listing())

    # ------------------------------------------------------------ the working copy's index

    def _index(self) -> dict:
        try:
            return json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_index(self, index: dict) -> None:
        self._index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._index_path.with_name(f".{self._index_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self._index_path)

    @staticmethod
    def _tag(info: dict) -> str:
        """What changes when an object is rewritten: its ETag, checksum or modification time, and its size."""
        for key in ("ETag", "etag", "md5", "blob_id", "sha", "mtime", "LastModified", "created"):
            if info.get(key) is not None:
                return f"{info.get('size')}:{info[key]}"
        return str(info.get("size"))

    @staticmethod
    def _stat(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    # ------------------------------------------------------------ down and up

    def pull(self, log=lambda msg: None) -> Path:
        """Make the working copy an exact copy of the folder (what is unchanged on both sides is not fetched)."""
        listing, index = self.listing(), self._index()
        self.local.mkdir(parents=True, exist_ok=True)
        fetched = 0
        for name, info in sorted(listing.items()):
            path, tag = self.local / name, self._tag(info)
            seen = index.get(name)
            if path.is_file() and seen and seen["tag"] == tag and seen["stat"] == self._stat(path):
                continue
            index[name] = {"tag": tag, "stat": self._stat(self._download(name))}
            fetched += int(info.get("size") or 0)
        for path in sorted(self.local.rglob("*"), reverse=True):
            name = str(path.relative_to(self.local))
            if _ours(path) and name not in listing:
                path.unlink()  # the working copy holds only what the bucket holds (and a writer's temporaries)
                index.pop(name, None)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        self._save_index({k: v for k, v in index.items() if k in listing})
        if fetched:
            log(f"{self.url}: fetched {fetched / 1e6:,.1f} MB into its working copy in the cache")
        return self.local

    def _download(self, name: str) -> Path:
        """One object into the working copy, under its name only once complete."""
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.pull-{os.getpid()}")
        self.fs.get_file(self._remote(name), str(tmp))
        os.replace(tmp, path)
        return path

    def fetch(self, name: str) -> Path:
        """One object into the working copy (a shard another node wrote, which this one must rewrite)."""
        path = self._download(name)
        index = self._index()
        index[name] = {"tag": self._tag(self.fs.info(self._remote(name))), "stat": self._stat(path)}
        self._save_index(index)
        return path

    def upload(self, name: str) -> None:
        """One finished file of the working copy, as one object (whole or not at all)."""
        path = self.local / name
        self.fs.put_file(str(path), self._remote(name))
        info = self.fs.info(self._remote(name))
        index = self._index()
        index[name] = {"tag": self._tag(info), "stat": self._stat(path)}
        self._save_index(index)

    def push(self, log=lambda msg: None) -> None:
        """Make the folder what the working copy is: an old manifest is removed first (the folder is then
        uncommitted), files the copy had and no longer has are deleted, changed ones uploaded, and the manifest
        last. Objects the copy never had (shards workers on other machines uploaded) stay."""
        listing, index = self.listing(), self._index()
        here = {str(p.relative_to(self.local)): p for p in self.local.rglob("*") if _ours(p)}
        manifest_changed = MANIFEST in listing and (
            MANIFEST not in here or index.get(MANIFEST, {}).get("stat") != self._stat(here[MANIFEST])
        )
        if manifest_changed:
            self.fs.rm_file(self._remote(MANIFEST))
        for name in sorted((set(listing) & set(index)) - set(here) - {MANIFEST}):
            self.fs.rm_file(self._remote(name))
            index.pop(name, None)
        self._save_index(index)
        for name, path in sorted(here.items(), key=lambda item: item[0] == MANIFEST):
            seen = index.get(name)
            if name in listing and seen and seen["stat"] == self._stat(path):
                continue
            self.upload(name)
        log(f"{self.url}: uploaded; in step with its working copy in the cache")

    # ------------------------------------------------------------ one writer per folder

    @contextmanager
    def locked(self, log=lambda msg: None) -> Iterator[None]:
        """Hold the folder's lock object (owner and heartbeat inside) for the duration. It is created only if
        absent where the store can say so (a conditional create); a holder that is gone (a dead process on this
        host, or no heartbeat for STALE_S seconds) is taken over with a warning."""
        path = self._remote(LOCK)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": redact.command_line(),
            "token": os.urandom(8).hex(),
        }
        while not self._create(path, me):
            holder = self._read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if not _gone(holder):
                raise CurateError(
                    f"{self.url} is in use by process {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('since')} ({redact.text(str(holder.get('command', '')))}); wait for it to finish, or "
                    f"delete {self.url}/{LOCK} if that run is gone"
                )
            log(f"warning: taking over {self.url}/{LOCK}: the run that held it is gone")
            self.fs.rm_file(path)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(path, me, stop), daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            holder = self._read_lock(path)
            if holder and holder.get("token") == me["token"]:
                self.fs.rm_file(path)

    def _create(self, path: str, me: dict) -> bool:
        try:
            return self._create_lock(path, me)
        except OSError as e:  # no such bucket, no permission: say where
            raise CurateError(f"{self.url}: cannot write there ({' '.join(str(e.strerror or e).split())})") from None

    def _create_lock(self, path: str, me: dict) -> bool:
        body = json.dumps({**me, "heartbeat": time.time()}).encode()
        try:
            with self.fs.open(path, "xb") as f:  # s3fs: If-None-Match; local and memory: O_EXCL
                f.write(body)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # a store without conditional create: check, then write
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, body)
            return (self._read_lock(path) or {}).get("token") == me["token"]

    def _read_lock(self, path: str) -> dict | None:
        try:
            holder = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"heartbeat": 0}  # unreadable: treated as stale
        return holder if isinstance(holder, dict) else {"heartbeat": 0}

    def _heartbeat(self, path: str, me: dict, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                self.fs.pipe_file(path, json.dumps({**me, "heartbeat": time.time()}).encode())
            except Exception:  # a missed beat is retried; the run itself reports storage errors
                pass


def _ours(path: Path) -> bool:
    """A finished file of a working copy: not a temporary of a writer or of `pull`, not a local lock."""
    from .io import is_temporary

    return path.is_file() and not is_temporary(path) and ".pull-" not in path.name and path.name != LOCK


def _gone(holder: dict) -> bool:
    """Whether a lock object's holder no longer runs: a dead pid on this host, or a heartbeat too old."""
    from .io import pid_alive

    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not pid_alive(holder["pid"])
    return time.time() - float(holder.get("heartbeat") or 0) > STALE_S


HUB_DATASET = re.compile(r"hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(/.*)?$")


def pin_hub_revision(url: str) -> tuple[str, str | None]:
    """(the URL at a commit, that commit) for a Hub dataset URL: `hf://datasets/ORG/NAME[@REVISION]/...` is read at
    the commit its revision (default main) points to now, so every worker reads the same files and the manifest
    can name them; other URLs and paths come back as they are."""
    m = HUB_DATASET.match(str(url))
    if not m:
        return str(url), None
    org, name, revision, rest = m.groups()
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return str(url), revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        sha = HfApi().dataset_info(f"{org}/{name}", revision=revision).sha
    except HfHubHTTPError as e:
        raise CurateError(f"{url}: the Hub did not answer for {org}/{name} ({e})") from None
    return f"hf://datasets/{org}/{name}@{sha}{rest or ''}", sha


def tag(url: str) -> str:
    """What changes when a remote file is rewritten (its size and ETag, checksum or time)."""
    fs, path = filesystem(url)
    return RemoteFolder._tag(fs.info(path))


def fingerprint(url: str) -> str:
    """Identity of a remote file or folder from its objects' names, sizes and ETags or checksums (the store
    computed them; the data is not downloaded to be identified)."""
    fs, path = filesystem(url)
    try:
        files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        raise CurateError(f"{url}: no such file or folder") from None
    h = hashlib.sha256()
    for name, info in sorted(files.items()):
        if info.get("type", "file") == "file":
            h.update(f"{name[len(path) :]}\0{RemoteFolder._tag(info)}\0".encode())
    return h.hexdigest()[:16]
