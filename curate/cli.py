"""The `curate` command. Thin: options come from the config models (`curate.options`), each command calls one
stage (or the pipeline), draws its progress and prints a summary of the manifest it returns."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config.report import ReportConfig
from .errors import CurateError
from .executor import execute, require_stage
from .options import command, sectioned_command
from .progress import LineReporter, Reporter
from .registry import get, in_order

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Q-Tuning data curation for SFT: score, prune, and write trainer-ready Parquet.",
)


@app.callback()
def storage_options(
    options: str = typer.Option(
        None,
        "--storage-options",
        help="fsspec options for URLs (s3://, gs://, hf://) as JSON, for all protocols or per protocol "
        '(\'{"s3": {"endpoint_url": "http://..."}}\'); credentials otherwise come from the environment and the '
        "fsspec config. @FILE reads the JSON from a file (keeps secrets off the command line, which `ps` shows). "
        "Never written to a manifest, a lock or a log.",
    ),
):
    """Q-Tuning data curation for SFT: score, prune, and write trainer-ready Parquet."""
    from . import storage

    with user_errors():
        storage.set_options(options)


console = Console(stderr=True, soft_wrap=True)  # an error or log line stays one line, whatever the width
out = Console(markup=False)  # results name paths, ids and groups from the user: `[/x]` in them is text, not markup

OS_HINTS = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EACCES: "choose a folder you can write to",
    errno.EROFS: "choose a writable folder",
    errno.ENOTDIR: "a folder was expected there, not a file",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "a file was expected there, not a folder",
}


def typed(text: str) -> str:
    """A message naming the URLs the user typed, not the working copies that stood in for them."""
    from .storage import as_typed

    return as_typed(text)


@contextmanager
def user_errors():
    """Errors a user can act on become one line and exit code 2; Ctrl-C says how to resume."""
    try:
        yield
    except CurateError as e:
        console.print(f"[bold red]error:[/] {escape(typed(str(e)))}")
        raise typer.Exit(2) from None
    except OSError as e:  # at the edges: disks, permissions, paths
        where = f"{typed(str(e.filename))}: " if e.filename else ""
        hint = OS_HINTS.get(e.errno, "check the path")
        console.print(f"[bold red]error:[/] {escape(where)}{escape(typed(e.strerror or str(e)))} ({hint})")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/]: finished shards are kept; run the same command again to resume")
        raise typer.Exit(130) from None


class RichReporter(Reporter):
    """A progress bar with a tokens/s rate and an ETA, and log lines above it."""

    def __init__(self):
        self.bar: Progress | None = None
        self.task = None
        self.t0 = 0.0
        self.tokens0 = None

    def log(self, message: str) -> None:
        console.print(escape(typed(message)))  # paths and messages may hold brackets; stages write plain text

    def start(self, label: str, total: int | None, unit: str = "rows") -> None:
        self.finish()
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.bar.add_task(label, total=total, rate="")
        self.t0, self.tokens0 = time.time(), None
        self.bar.start()

    def advance(self, done: int, tokens: int = 0) -> None:
        if self.bar is None:
            return
        if self.tokens0 is None:
            self.tokens0 = tokens  # tokens of resumed shards do not count towards this run's rate
        rate = (tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, rate=f"{rate:,.0f} tok/s" if tokens else "")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def reporter() -> Reporter:
    """A progress bar in a terminal; in a log (Slurm, Ray, nohup, CI), a plain line every
    CURATE_PROGRESS_INTERVAL seconds (30) and an early estimate."""
    if console.is_terminal:
        return RichReporter()
    interval = float(os.environ.get("CURATE_PROGRESS_INTERVAL", "30"))
    write = lambda line: console.print(typed(line), markup=False, highlight=False)
    return LineReporter(write, interval, min(5.0, interval))


def quiet(fn, *args):
    """Run a stage with library warnings silenced (transformers and vLLM are chatty); progress stays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# ---------------------------------------------------------------- the stages, from their declarations

# One --force for every command: a stage's own finished result is redone, never a file it did not write.
FORCE = typer.Option(
    False,
    "--force",
    help="Redo every stage this command runs, even where its finished result is there (only q-curate's own "
    "files are replaced).",
)


def show(stage, result) -> None:
    for line in stage.summary(result):  # text unwrapped, so that a config or a path can be pasted from a log
        line = typed(line) if isinstance(line, str) else line
        out.print(line, highlight=False, soft_wrap=isinstance(line, str))


def run_with_progress(stage, cfg, force: bool):
    rep = reporter()
    try:
        return quiet(execute, stage, cfg, rep, force)
    finally:
        rep.finish()


def add_stage_command(stage) -> None:
    """`curate NAME`: the stage's options from its config model (or the sections it exposes, or a YAML file of its
    config), `--force`, and its summary."""
    if stage.cli.file:
        add_file_command(stage)
        return

    def cmd(cfg, force: bool = FORCE):
        with user_errors():
            show(stage, run_with_progress(stage, cfg, force))

    cmd.__doc__ = stage.doc
    if stage.cli.sections:
        declared = sectioned_command(stage.config, list(stage.cli.sections), arguments=stage.cli.arguments)
    else:
        declared = command(stage.config, arguments=stage.cli.arguments, first=stage.cli.first)
    app.command(stage.name)(declared(cmd))


def add_file_command(stage) -> None:
    """`curate NAME FILE.yaml [--set k=v]`: a config with sections and lists is a file, its paths relative to it."""
    from .config.base import load_model

    def cmd(
        path: Path = typer.Argument(..., help=stage.cli.file, metavar="CONFIG"),
        set_: list[str] = typer.Option(
            [], "--set", help="Override a config value, e.g. --set prune.ratio=0.25 (repeatable)."
        ),
        force: bool = FORCE,
    ):
        with user_errors():
            cfg = load_model(stage.name, path, set_, f"{stage.name} config")
            show(stage, run_with_progress(stage, cfg, force))

    cmd.__doc__ = stage.doc
    app.command(stage.name)(cmd)


for _stage in in_order():
    add_stage_command(_stage)


# ---------------------------------------------------------------- commands that are not stages


# Not a stage: a view of one sample in the terminal; it writes nothing.
@app.command("inspect")
def inspect_cmd(
    run_dir: str = typer.Argument(
        ..., help="A run folder (scores/ + pruned/) or a `curate prune` folder: a path or a URL."
    ),
    id: str = typer.Option(..., "--id", help="Sample id to show."),
):
    """One sample's tokens with their masks, log-probs, entropies and pruning scores, in the terminal."""
    from .extras import require
    from .inspect_sample import sample_table

    with user_errors():
        require("transformers", purpose="curate inspect")
        out.print(sample_table(run_dir, id))


# Not a stage: a server over a finished run; it writes nothing.
@app.command("explore")
def explore_cmd(
    run_dir: str = typer.Argument(
        ..., help="A run folder (scores/ + pruned/), a `curate prune` or a `refresh` folder: a path or a URL."
    ),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0: any free one)."),
):
    """Every sample on the EU plane in your browser: hover, zoom, filter, search, select and download ids, and
    click a point to read its tokens. Serves on 127.0.0.1 only, until Ctrl-C."""
    from .explore import serve_in_background
    from .extras import require

    with user_errors():
        require("plotly", "transformers", purpose="curate explore")
        try:
            server, url = serve_in_background(run_dir, port, lambda m: console.print(m, markup=False))
        except OSError as e:
            raise CurateError(f"--port {port}: {e.strerror}; choose another port (or --port 0)") from None
        out.print(f"exploring {run_dir} at {url} (Ctrl-C stops)", soft_wrap=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()


# Not a stage: it checks the manifests of every stage under a folder; it writes nothing.
@app.command("verify")
def verify_cmd(
    path: str = typer.Argument(..., help="Any folder q-curate wrote (a stage or a whole run folder): a path or a URL."),
):
    """Check every file of every finished stage under PATH against its manifest (sizes and checksums, nothing stray).

    A URL is checked in its working copy, fetched first (only what changed since the last fetch)."""
    from .verify import verify_location

    with user_errors():
        rows, bad = verify_location(path)
        t = Table(title=f"verify {path}")
        for col in ("folder", "stage", "files", "result"):
            t.add_column(col)
        for folder, stage, n, problems in rows:
            t.add_row(str(folder), stage, str(n), "ok" if not problems else "; ".join(f"{f}: {w}" for f, w in problems))
        out.print(t)
    if bad:
        raise typer.Exit(1)


# Not a stage: it copies a finished folder, as its manifest lists it, to a destination that is no stage's output.
@app.command("push")
def push_cmd(
    pruned: str = typer.Argument(..., help="A `curate prune` (or retokenize) folder: a path or a URL."),
    dest: str = typer.Argument(..., help="hf://datasets/ORG/NAME (a Hub dataset repo), or a folder URL or path."),
    private: bool = typer.Option(False, "--private", help="Hub: create the repo private (when it does not exist)."),
    message: str = typer.Option(None, "--message", help="Hub: the commit message (default: what was pruned)."),
):
    """Publish a pruned dataset: verified against its manifest, then uploaded with its card (README.md), samples,
    stats and manifest, so that `datasets.load_dataset` reads it from there. A Hub repo gets one commit."""
    from .publish import push

    with user_errors():
        where = quiet(push, pruned, dest, lambda line: console.print(escape(line)), private, message)
        out.print(f"pushed {pruned} to {where}")


# Not a stage of its own: it runs the `run` stage on the built-in pipeline (a stale demo folder is recomputed).
@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder for the demo."),
    force: bool = FORCE,
):
    """Run the whole pipeline on the built-in demo data with the built-in SmolLM2-135M model.

    A demo folder left by other settings or an older q-curate is recomputed (a minute on CPU)."""
    from .stages.run import run_demo

    with user_errors():
        require_stage("report")
        rep = reporter()
        show(get("run"), quiet(run_demo, out_dir, rep, force))
        report_path = quiet(execute, get("report"), ReportConfig(run=str(out_dir)), rep)["report"]
    out.print("\nDemo finished.", style="bold green")
    out.print(
        f"Results in {out_dir}/:\n"
        f"  scores:  {out_dir}/scores/part-*.parquet\n"
        f"  pruned:  {out_dir}/pruned/data/train-*.parquet  (datasets.load_dataset('{out_dir}/pruned'))\n"
        f"  samples: {out_dir}/pruned/samples.parquet (every sample's ppl, ent, quadrant, fate)\n"
        f"  stats:   {out_dir}/pruned/stats.json\n"
        f"  report:  {report_path} (EU plane picture: {out_dir}/report/eu_plane.png)\n"
        f"  explore: {out_dir}/report/explore.html, or `curate explore {out_dir}` (every sample, interactive)",
        soft_wrap=True,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
