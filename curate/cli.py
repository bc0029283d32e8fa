"""The `curate` command. Thin: options come from the config models (`curate.options`), each command calls one
stage (or the pipeline), draws its progress and prints a summary of the manifest it returns."""

from __future__ import annotations

import errno
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import (
    ExportConfig,
    ProbeConfig,
    PruneConfig,
    PruneOptions,
    RefreshConfig,
    ReportConfig,
    RetokenizeConfig,
    ScoreConfig,
    ScoreOptions,
    TrainConfig,
    TrainOptions,
)
from .errors import CurateError, StaleOutputError
from .extras import require_stages
from .options import command, sectioned_command
from .progress import Reporter
from .schema import QUADRANT_AXES, QUADRANT_NAMES, QUADRANTS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Q-Tuning data curation for SFT: score, prune, and write trainer-ready Parquet.",
)
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


@contextmanager
def user_errors():
    """Errors a user can act on become one line and exit code 2; Ctrl-C says how to resume."""
    try:
        yield
    except CurateError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except OSError as e:  # at the edges: disks, permissions, paths
        where = e.filename or ""
        hint = OS_HINTS.get(e.errno, "check the path")
        console.print(f"[bold red]error:[/] {escape(str(where))}: {escape(e.strerror or str(e))} ({hint})")
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
        console.print(escape(message))  # paths and messages may hold brackets; stages write plain text

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


def reporter() -> RichReporter:
    return RichReporter()


def quiet(fn, *args):
    """Run a stage with library warnings silenced (transformers and vLLM are chatty); progress stays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# ---------------------------------------------------------------- summaries


def print_score_summary(manifest: dict) -> None:
    c = manifest["counts"]
    t = Table(title=f"scores: {manifest['config']['out']}", show_header=False)
    t.add_row("model", manifest["model"]["name"])
    t.add_row("backend", f"{manifest['config']['backend']} ({manifest.get('backend_choice', '')})")
    if manifest.get("dtype"):
        t.add_row("dtype", f"{manifest['dtype']['dtype']} ({manifest['dtype']['why']})")
    entropy = manifest["entropy"]
    bound = f" (max error {entropy['topk_max_error_nats']:.3g} nats)" if "topk_max_error_nats" in entropy else ""
    t.add_row("entropy", entropy["method"] + bound)
    t.add_row("rows read", f"{c['rows_read']:,}")
    t.add_row("samples scored", f"{c['samples']:,}")
    t.add_row("skipped", f"{c['skipped']:,} " + (str(manifest["skipped_by_reason"]) if c["skipped"] else ""))
    dup = manifest["duplicates"]
    if dup["groups"]:
        t.add_row(
            "duplicates",
            f"{dup['later_copies']:,} later copies of {dup['groups']:,} conversations "
            + ("(dropped)" if dup["dropped"] else "(kept; --dedup drops them)"),
        )
    t.add_row("truncated", f"{c['truncated']:,}")
    t.add_row("tokens / trainable", f"{c['tokens']:,} / {c['trainable_tokens']:,}")
    s = manifest["scoring"]
    t.add_row(
        "scoring speed",
        f"{s['tokens_per_s']:,.0f} tokens/s ({s['engine']}, {s['workers']} worker(s))"
        if s["tokens_per_s"]
        else "(nothing scored in this run)",
    )
    t.add_row("shards", f"{len(manifest['files'])} x part-NNNNN.parquet")
    t.add_row("wall time", f"{manifest['wall_time_s']:.1f} s")
    out.print(t)


def print_prune_summary(manifest: dict) -> None:
    st = manifest["stats"]
    t = Table(title=f"EU plane and pruning: {manifest['config']['out']}")
    for col in ("quadrant", "meaning", "samples", "kept"):
        t.add_column(col, justify="right" if col in ("samples", "kept") else "left")
    for q in QUADRANTS:
        t.add_row(
            q, f"{QUADRANT_NAMES[q]} ({QUADRANT_AXES[q]})", f"{st['quadrants'][q]:,}", f"{st['kept_by_quadrant'][q]:,}"
        )
    out.print(t)
    m = st["medians"]
    out.print(f"medians: ppl {m['ppl']:.3f}, entropy {m['ent']:.3f}")
    if st.get("thresholds"):
        th = st["thresholds"]
        out.print(
            f"alpha {th['alpha']:.4f}: Q2 = ppl > {th['ppl_high']:.3f} and ent <= {th['ent_low']:.3f}; "
            f"Q4 = ppl <= {th['ppl_low']:.3f} and ent > {th['ent_high']:.3f}"
        )
    elif st.get("alpha_per_batch"):
        a = st["alpha_per_batch"]
        out.print(f"alpha per batch or group: min {a['min']:.3f}, mean {a['mean']:.3f}, max {a['max']:.3f}")
    for g, v in (st.get("groups") or {}).items():
        out.print(f"group {g}: kept {v['K']:,} of {v['N']:,} (ratio {v['ratio']})")
    tok = st["trainable_tokens"]
    out.print(f"kept {st['K']:,} of {st['N']:,} samples ({st['sample_ratio']:.1%}): {st['selection']}")
    out.print(
        f"loss tokens: {tok['after']:,} of {tok['all_samples']:,} trainable ({st['loss_token_ratio']:.1%}; "
        f"{st['loss_token_ratio_in_kept']:.1%} of the kept samples' {tok['kept_samples']:,})"
    )
    out.print(f"pruned data: {Path(manifest['config']['out']) / 'data'}/train-*.parquet")


def print_train_summary(manifest: dict) -> None:
    c = manifest["counts"]
    last = manifest["loss_history"][-1]["loss"] if manifest.get("loss_history") else "n/a"
    out.print(
        f"trained {c['steps']:,} steps on {c['samples']:,} samples ({c['loss_tokens']:,} loss tokens), "
        f"final loss {last}; model: {manifest['config']['out']}"
    )


def print_refresh_summary(manifest: dict) -> None:
    summary, run_dir = manifest["summary"], Path(manifest["config"]["out"])
    t = Table(title=f"refresh: {run_dir}")
    for col in ("round", "scored by", *(f"{q} (kept)" for q in QUADRANTS), "kept", "loss tokens"):
        t.add_column(col, justify="left" if col == "scored by" else "right")
    for r in summary["rounds"]:
        q, k = r["quadrants"], r["kept_by_quadrant"]
        scorer = "start model" if r["round"] == 1 else f"round {r['round'] - 1} model"
        t.add_row(
            str(r["round"]),
            scorer,
            *(f"{q[x]:,} ({k[x]:,})" for x in QUADRANTS),
            f"{r['K']:,} / {r['N']:,}",
            f"{r['loss_token_ratio']:.1%}",
        )
    out.print(t)
    for tr in summary["transitions"]:
        m = Table(title=f"quadrants, round {tr['from']} -> {tr['to']}")
        m.add_column(f"round {tr['from']}")
        for q in QUADRANTS:
            m.add_column(f"{q} in {tr['to']}", justify="right")
        for q, row in tr["counts"].items():
            m.add_row(q, *(f"{row[p]:,}" for p in QUADRANTS))
        out.print(m)
        out.print(
            f"{tr['stayed']:,} of {tr['samples']:,} samples stayed in their quadrant; "
            f"{tr['kept_both']:,} were kept in both rounds"
        )
    out.print(f"rounds: {run_dir}/round-NN/{{scores,pruned,model}}; summary: {run_dir}/_manifest.json")


def print_results(results: dict) -> None:
    for stage, printer in (
        ("refresh", print_refresh_summary),
        ("score", print_score_summary),
        ("prune", print_prune_summary),
        ("train", print_train_summary),
    ):
        if stage in results:
            printer(results[stage])


def write_report(run: Path, rep: Reporter) -> str:
    from .stages import report

    return quiet(report.run, ReportConfig(run=str(run)), rep)["report"]


# ---------------------------------------------------------------- commands


@app.command("score")
@command(ScoreConfig, arguments=("input",), first=("out",))
def score_cmd(
    cfg: ScoreConfig,
    force: bool = typer.Option(False, "--force", help="Redo the run even if OUT holds finished or partial scores."),
):
    """Score every token of INPUT with a reference model: log-prob and entropy per token, as Parquet."""
    from .stages import score

    with user_errors():
        rep = reporter()
        try:
            print_score_summary(quiet(score.run, cfg, rep, force))
        finally:
            rep.finish()


@app.command("prune")
@command(PruneConfig, arguments=("scores",), first=("out",))
def prune_cmd(
    cfg: PruneConfig,
    force: bool = typer.Option(False, "--force", help="Redo even if OUT holds this exact result."),
    report: bool = typer.Option(False, "--report", help="Also write the EU-plane report into OUT/report."),
):
    """Keep the valuable samples (Q2, Q4) to an exact budget and mask noisy tokens in Q2 samples."""
    from .stages import prune

    with user_errors():
        rep = reporter()
        print_prune_summary(prune.run(cfg, rep, force))
        if report:
            out.print(f"report: {write_report(Path(cfg.out), rep)}")


@app.command("train")
@command(TrainConfig, arguments=("data",), first=("out",))
def train_cmd(
    cfg: TrainConfig, force: bool = typer.Option(False, "--force", help="Retrain even if OUT holds this exact result.")
):
    """Fine-tune a model on pruned data with the built-in transformers trainer (labels = -100 are not in the loss)."""
    from .stages import train

    with user_errors():
        print_train_summary(quiet(train.run, cfg, reporter(), force))


@app.command("export")
@command(ExportConfig, arguments=("pruned",))
def export_cmd(
    cfg: ExportConfig,
    force: bool = typer.Option(False, "--force", help="Replace OUT even if it is not an earlier export."),
):
    """Write the pruned data in the shape a training framework accepts, with a ready-to-paste config."""
    from .stages import export

    with user_errors():
        manifest = export.run(cfg, reporter(), force)
        snippet = Path(manifest["config_file"]).read_text()
    out.print(snippet, markup=False, highlight=False)
    out.print(f"exported to {cfg.out}; config written to {manifest['config_file']}", markup=False)


@app.command("retokenize")
@command(RetokenizeConfig, arguments=("pruned",), first=("model", "out"))
def retokenize_cmd(
    cfg: RetokenizeConfig,
    force: bool = typer.Option(False, "--force", help="Redo even if OUT holds this exact result."),
):
    """Carry a pruned dataset over to another model's tokenizer and chat template (score small, train any model)."""
    from .stages import retokenize

    with user_errors():
        manifest = quiet(retokenize.run, cfg, reporter(), force)
        st = manifest["stats"]
        out.print(
            f"re-tokenised {st['samples']:,} samples for {cfg.model}: loss tokens {st['loss_tokens_source']:,} "
            f"-> {st['loss_tokens_target']:,}; kept loss characters carried over: "
            f"{st['kept_chars_ratio']:.4f}; data: {cfg.out}/data/train-*.parquet"
        )


@app.command("refresh")
@sectioned_command(
    RefreshConfig,
    [
        (None, RefreshConfig, ("input", "out", "rounds", "train_cmd")),
        ("score", ScoreOptions, ("model", "format", "fields", "limit", "max_length", "backend", "device", "dtype")),
        ("prune", PruneOptions, ("ratio", "token_ratio")),
        ("train", TrainOptions, ("epochs", "max_steps", "lr", "batch_size", "lora_rank")),
    ],
    arguments=("input",),
)
def refresh_cmd(
    cfg: RefreshConfig, force: bool = typer.Option(False, "--force", help="Recompute every stage of every round.")
):
    """The dynamic loop: score with the current model, prune, train, and re-score with the new checkpoint.

    Every other stage setting (scope, lam, LoRA alpha, ...) is available in a pipeline config with a refresh
    section: see pipelines/refresh.yaml and `curate run`."""
    from .stages import refresh

    with user_errors():
        require_stages(("report", None))  # drawn at the end: fail now, not after the loop
        rep = reporter()
        manifest = quiet(refresh.run, cfg, rep, force)
        print_refresh_summary(manifest)
        out.print(f"report: {write_report(Path(cfg.out), rep)}")


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see pipelines/)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config value, e.g. --set prune.ratio=0.25 (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
):
    """Run the stages a pipeline YAML describes (score -> prune [-> train], or the refresh loop) into one run folder.

    Finished stages are skipped."""
    from .config import load_pipeline
    from .pipeline import run_pipeline

    with user_errors():
        p = load_pipeline(pipeline, set_)
        if p.refresh:
            require_stages(("report", None))
        rep = reporter()
        results = quiet(run_pipeline, p, rep, force)
        print_results(results)
        if "refresh" in results:
            out.print(f"report: {write_report(Path(p.run_dir), rep)}")
        out.print(f"run folder: {p.run_dir} (resolved config: {Path(p.run_dir) / 'config.yaml'})")


@app.command("experiment")
def experiment_cmd(
    config: Path = typer.Argument(..., help="Experiment YAML (see pipelines/experiments/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set eval.limit=50 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage of every arm."),
):
    """Does the pruning pay off? Score once, prune every arm from the same scores, train each identically, evaluate.

    Writes RUN/results.json, results.md (the tables) and results.png; finished arms are not retrained."""
    from . import experiment
    from .config import ExperimentConfig, load_model

    with user_errors():
        cfg = load_model(ExperimentConfig, config, set_, "experiment config")
        manifest = quiet(experiment.run, cfg, reporter(), force)
        out.print((Path(cfg.run_dir) / "results.md").read_text(), markup=False, highlight=False)
        out.print(
            f"results: {cfg.run_dir}/results.json, results.md, results.png "
            f"({manifest['results']['wall_time_s'] / 60:.1f} min)"
        )


@app.command("probe")
@sectioned_command(
    ProbeConfig,
    [
        (None, ProbeConfig, ("input", "out", "fraction", "corruptions", "ratio", "seed", "random_seeds")),
        ("score", ScoreOptions, ("model", "format", "fields", "limit", "max_length", "backend", "device", "dtype")),
        ("prune", PruneOptions, ("entropy_positions", "fill", "keep_duplicates")),
    ],
    arguments=("input",),
)
def probe_cmd(cfg: ProbeConfig, force: bool = typer.Option(False, "--force", help="Rescore the corrupted copy.")):
    """How much broken data does each strategy keep? Corrupt a copy of INPUT, score it once, select with every
    strategy and placement at the same budget, and tabulate the corrupted share kept (no training: minutes).

    Writes OUT/probe.md (the table), OUT/probe.json, and the corrupted copy with its list of corrupted ids."""
    from . import probe

    with user_errors():
        quiet(probe.run, cfg, reporter(), force)
        out.print((Path(cfg.out) / "probe.md").read_text(), markup=False, highlight=False)
        out.print(f"results: {Path(cfg.out) / 'probe.md'}, probe.json")


@app.command("report")
@command(ReportConfig, arguments=("run",))
def report_cmd(
    cfg: ReportConfig, force: bool = typer.Option(False, "--force", help="Redraw even if the report is current.")
):
    """Draw the EU plane (eu_plane.png, histograms.png) and write a self-contained report.html."""
    from .stages import report

    with user_errors():
        out.print(f"report: {quiet(report.run, cfg, reporter(), force)['report']}")


@app.command("inspect")
def inspect_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (scores/ + pruned/) or a `curate prune` folder."),
    id: str = typer.Option(..., "--id", help="Sample id to show."),
):
    """One sample's tokens with their masks, log-probs, entropies and pruning scores, in the terminal."""
    from .stages.inspect import sample_table

    with user_errors():
        require_stages(("inspect", None))
        out.print(sample_table(run_dir, id))


@app.command("verify")
def verify_cmd(path: Path = typer.Argument(..., help="Any folder q-curate wrote (a stage or a whole run folder).")):
    """Check every file of every finished stage under PATH against its manifest (sizes and checksums, nothing stray)."""
    from .verify import verify_tree

    with user_errors():
        rows, bad = verify_tree(path)
        t = Table(title=f"verify {path}")
        for col in ("folder", "stage", "files", "result"):
            t.add_column(col)
        for folder, stage, n, problems in rows:
            t.add_row(str(folder), stage, str(n), "ok" if not problems else "; ".join(f"{f}: {w}" for f, w in problems))
        out.print(t)
    if bad:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder for the demo."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
):
    """Run the whole pipeline on the built-in demo data with the built-in SmolLM2-135M model.

    A demo folder left by other settings or an older q-curate is recomputed (a minute on CPU)."""
    from .demo import demo_pipeline
    from .pipeline import run_pipeline

    with user_errors():
        require_stages(("report", None))
        rep = reporter()
        try:
            results = quiet(run_pipeline, demo_pipeline(out_dir), rep, force)
        except StaleOutputError:  # a demo from an older version: it takes a minute to redo, so redo it
            rep.log(f"{out_dir} holds a demo run from other settings or an older q-curate; recomputing it")
            results = quiet(run_pipeline, demo_pipeline(out_dir), rep, True)
        print_results(results)
        report_path = write_report(out_dir, rep)
    out.print("\nDemo finished.", style="bold green")
    out.print(
        f"Results in {out_dir}/:\n"
        f"  scores:  {out_dir}/scores/part-*.parquet\n"
        f"  pruned:  {out_dir}/pruned/data/train-*.parquet  (load with datasets.load_dataset('parquet', ...))\n"
        f"  samples: {out_dir}/pruned/samples.parquet (every sample's ppl, ent, quadrant, fate)\n"
        f"  stats:   {out_dir}/pruned/stats.json\n"
        f"  report:  {report_path} (EU plane picture: {out_dir}/report/eu_plane.png)"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
