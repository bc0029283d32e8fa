"""`curate explore RUN`: every sample on the EU plane, in the browser, and from a point to its tokens.

A small HTTP server on 127.0.0.1 (never another interface) serves one page (`data/explore.html`), the plotting
library that ships with plotly's Python package (no CDN), and the run's data on demand, read through the
manifests that wrote it: the plane as typed arrays (`/api/plane`, `/api/column/NAME`, `/api/ids`), one sample
token by token (`/api/sample?id=`), and a search by id or text (`/api/search?q=`). It serves nothing else: no
path from a request ever reaches the file system. Every string from the data reaches the page as JSON and is put
into it as text. `curate report` writes the same page self-contained (data inline) for runs up to
`INLINE_LIMIT` samples.
"""

from __future__ import annotations

import json
import threading
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import polars as pl

from . import io, runs
from .errors import CurateError
from .schema import SAMPLES, STATS

INLINE_LIMIT = 1_000  # samples: beyond it `curate report` keeps its pictures and points to `curate explore`
SEARCH_LIMIT = 200
FATES = ("kept", "dropped", "duplicate", "excluded")


def plotly_js() -> bytes:
    """The plotting library, from the plotly package installed with q-curate's `report` extra."""
    try:
        return (resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise CurateError(
            "curate explore needs plotly, which is not installed: pip install 'q-curate[report]'"
        ) from None


def page_html() -> str:
    return (resources.files("curate") / "data" / "explore.html").read_text(encoding="utf-8")


class Explorer:
    """The data of one run, as the page asks for it."""

    def __init__(self, run: runs.Run):
        self.run = run
        self.stats = io.read_json(self.run.pruned / STATS)
        samples = pl.read_parquet(self.run.pruned / SAMPLES, glob=False)
        blank = pl.lit(None, pl.String)
        self.samples = samples.with_columns(
            fate=pl.when(pl.col("kept"))
            .then(pl.lit("kept"))
            .when(pl.col("duplicate_of").is_not_null() if "duplicate_of" in samples.columns else pl.lit(False))
            .then(pl.lit("duplicate"))
            .when(pl.col("excluded") if "excluded" in samples.columns else pl.lit(False))
            .then(pl.lit("excluded"))
            .otherwise(pl.lit("dropped")),
            group=pl.col("group").cast(pl.String) if "group" in samples.columns else blank,
        )
        self.row_of = {sid: i for i, sid in enumerate(self.samples["id"].to_list())}
        # which shard holds a sample: one file read per request, not all of them (seconds on a large run)
        self.shard = self.samples["shard"].to_list() if "shard" in self.samples.columns else None
        kept_shards = sorted({sh for sh, k in zip(self.shard or [], self.samples["kept"].to_list()) if k})
        pruned = self.run.pruned_files()
        self.pruned_of = dict(zip(kept_shards, pruned)) if len(kept_shards) == len(pruned) else None
        self.groups = sorted(g for g in self.samples["group"].unique().to_list() if g is not None)

    def plane(self) -> dict:
        """What the page needs before it draws: sizes, category names, medians and thresholds."""
        return {
            "n": self.samples.height,
            "quadrants": ["Q1", "Q2", "Q3", "Q4"],
            "fates": list(FATES),
            "groups": self.groups,
            "medians": self.stats.get("medians"),
            "thresholds": self.stats.get("thresholds"),
            "K": self.stats.get("K"),
            "rule": (self.stats.get("token_pruning") or {}).get("rule", ""),
        }

    def column(self, name: str) -> bytes:
        """One column for every sample, as little-endian typed-array bytes (Float32 or Uint16)."""
        s = self.samples
        if name in ("ppl", "ent"):
            return s[name].cast(pl.Float32).fill_null(float("nan")).to_numpy().astype("<f4").tobytes()
        if name == "n_trainable":
            return s[name].cast(pl.Float32).to_numpy().astype("<f4").tobytes()
        categories = {"quadrant": ["Q1", "Q2", "Q3", "Q4"], "fate": list(FATES), "group": self.groups}
        if name not in categories:
            raise KeyError(name)
        codes = {v: i for i, v in enumerate(categories[name])}
        return np.array([codes.get(v, 65535) for v in s[name].to_list()], dtype="<u2").tobytes()

    def ids(self) -> list[str]:
        return self.samples["id"].to_list()

    @cached_property
    def _lam(self) -> float:
        return self.stats["config"]["lam"]

    @cached_property
    def _scale(self) -> str:
        return self.stats["config"].get("token_score", "ppl")

    @cached_property
    def _tokenizer(self):
        return runs.scoring_tokenizer(self.run)

    def sample(self, sample_id: str) -> dict:
        """One sample token by token: each token's text, kind (prompt, kept, pruned, dropped), log-prob, entropy
        and pruning score, with the sample's place and fate."""
        if sample_id not in self.row_of:
            raise KeyError(sample_id)
        info = self.samples.row(self.row_of[sample_id], named=True)
        row = runs.rows_by_id(self._score_files(sample_id), [sample_id])[sample_id]
        pruned = runs.rows_by_id(self._pruned_files(sample_id), [sample_id], ["id", "loss_mask"]).get(sample_id)
        tokens = [
            {"t": t["t"], "k": t["k"], "lp": _number(t["lp"]), "ent": _number(t["ent"]), "s": _number(t["s"])}
            for t in runs.token_rows(
                self._tokenizer, row, pruned["loss_mask"] if pruned else None, self._lam, self._scale
            )
        ]
        trainable = sum(t["k"] != "prompt" for t in tokens)
        kept = sum(t["k"] == "kept" for t in tokens)
        return {
            "id": sample_id,
            "quadrant": info["quadrant"],
            "fate": info["fate"],
            "selection": info["selection"],
            "group": info["group"],
            "ppl": _number(info["ppl"]),
            "ent": _number(info["ent"]),
            "n_trainable": info["n_trainable"],
            "pruned": f"pruned {trainable - kept:,} of {trainable:,} tokens" if pruned else "",
            "tokens": tokens,
        }

    def snippet(self, sample_id: str) -> str:
        """The start of the sample's last response, for the tooltip."""
        if sample_id not in self.row_of:
            raise KeyError(sample_id)
        row = runs.rows_by_id(self._score_files(sample_id), [sample_id], ["id", "messages"])[sample_id]
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        text = " ".join((answers[-1] if answers else "").split())
        return text[:160] + ("…" if len(text) > 160 else "")

    def _score_files(self, sample_id: str) -> list[Path]:
        files = self.run.score_files()
        shard = self.shard[self.row_of[sample_id]] if self.shard else None
        return [files[shard]] if shard is not None and 0 <= shard < len(files) else files

    def _pruned_files(self, sample_id: str) -> list[Path]:
        shard = self.shard[self.row_of[sample_id]] if self.shard else None
        if self.pruned_of is None:
            return self.run.pruned_files()
        return [self.pruned_of[shard]] if shard in self.pruned_of else []

    def search(self, query: str) -> list[str]:
        """Ids equal to `query`, then ids and conversations that contain it (case-insensitive), up to SEARCH_LIMIT."""
        if not query:
            return []
        exact = [query] if query in self.row_of else []
        needle = query.lower()
        found = list(exact)
        for path in self.run.score_files():
            table = pl.read_parquet(path, columns=["id", "messages"], glob=False)
            text = table["messages"].list.eval(pl.element().struct.field("content")).list.join("\n").str.to_lowercase()
            hits = table.filter(
                pl.col("id").str.to_lowercase().str.contains(needle, literal=True)
                | text.str.contains(needle, literal=True)
            )["id"].to_list()
            found += [h for h in hits if h not in exact and h in self.row_of]
            if len(found) >= SEARCH_LIMIT:
                break
        return found[:SEARCH_LIMIT]

    def inline(self) -> dict:
        """Everything the page fetches, for a self-contained page (`curate report` on a small run)."""
        import base64

        names = ("ppl", "ent", "quadrant", "fate", "group", "n_trainable")
        return {
            "plane": self.plane(),
            "columns": {name: base64.b64encode(self.column(name)).decode() for name in names},
            "ids": self.ids(),
            "samples": {sid: self.sample(sid) for sid in self.ids()},
            "snippets": {sid: self.snippet(sid) for sid in self.ids()},
        }


def _number(x) -> float | None:
    return round(float(x), 6) if x is not None and np.isfinite(x) else None


def inline_json(obj) -> str:
    """JSON to put inside a <script>: every `<` escaped, so no text from the data (`</script>`, or `<!--` then
    `<script>`, which sends the HTML parser into its escaped state and swallows the page's own `</script>`) can end
    or change the script; the JSON reads back the same."""
    return json.dumps(obj).replace("<", "\\u003c")


def self_contained_page(explorer: Explorer) -> str:
    """The explorer page with its library and the run's data inline (no server): for runs up to INLINE_LIMIT."""
    data = inline_json(explorer.inline())
    library = plotly_js().decode().replace("</script", "<\\/script")
    page = page_html()
    page = page.replace('<script src="/plotly.js"></script>', f"<script>{library}</script>", 1)
    return page.replace("/*INLINE*/null", data, 1)


# ---------------------------------------------------------------- the server


def make_server(explorer: Explorer, port: int = 0, log=lambda msg: None) -> ThreadingHTTPServer:
    """The explorer's server on 127.0.0.1:`port` (0: any free port), not yet serving. It answers only requests
    addressed to itself (Host 127.0.0.1, localhost or [::1] with its port): a page elsewhere that points its own
    name at 127.0.0.1 (DNS rebinding) gets 403, never the data."""
    library, page = plotly_js(), page_html().encode()
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the terminal shows the URL, not every request
            pass

        def send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, obj, status: int = 200) -> None:
            self.send(status, json.dumps(obj).encode(), "application/json")

        def addressed_to_us(self) -> bool:
            port = server.server_address[1]
            return self.headers.get("Host", "") in {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}

        def do_GET(self):
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if not self.addressed_to_us():
                self.send_json({"error": "this server answers requests to 127.0.0.1 and localhost only"}, 403)
                return
            try:
                if url.path == "/":
                    self.send(200, page, "text/html; charset=utf-8")
                elif url.path == "/plotly.js":
                    self.send(200, library, "text/javascript")
                elif url.path == "/api/plane":
                    self.send_json(explorer.plane())
                elif url.path.startswith("/api/column/"):
                    self.send(200, explorer.column(url.path.rsplit("/", 1)[1]), "application/octet-stream")
                elif url.path == "/api/ids":
                    self.send_json(explorer.ids())
                elif url.path == "/api/sample":
                    self.send_json(explorer.sample(query.get("id", "")))
                elif url.path == "/api/snippet":
                    self.send_json(explorer.snippet(query.get("id", "")))
                elif url.path == "/api/search":
                    self.send_json(explorer.search(query.get("q", "")))
                else:
                    self.send_json({"error": "not found"}, 404)
            except KeyError:
                self.send_json({"error": "no such sample or column"}, 404)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except CurateError as e:  # e.g. the scoring model's tokenizer is gone: the page says so
                self.send_json({"error": str(e)}, 500)
            except Exception as e:  # a file of the run changed under us (a shard deleted): say which, keep serving
                message = f"cannot read the run's files: {' '.join(str(e).split())}"
                log(f"warning: {url.path}: {message}")
                self.send_json({"error": message}, 500)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    return server


def serve_in_background(run_dir: str | Path, port: int = 0, log=lambda msg: None) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a thread; returns it and its URL (tests and the command use this)."""
    server = make_server(Explorer(runs.locate(run_dir)), port, log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/"
