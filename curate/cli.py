"""The `curate` command. Thin: parse options, call a stage, draw progress, print a summary."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import CurateError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Q-Tuning data curation for SFT: score, prune, and write trainer-ready Parquet.")
console = Console(stderr=True)
out = Console()


@contextmanager
def _user_errors():
    try:
        yield
    except CurateError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def _stage_progress(label: str):
    from .stages.score import Progress as StageProgress

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), console=console, transient=False)
    state = {"task": None, "t0": None}

    def start(total):
        import time

        state["t0"] = time.time()
        state["task"] = bar.add_task(label, total=total, rate="")
        bar.start()

    def advance(rows, tokens):
        import time

        rate = tokens / max(time.time() - state["t0"], 1e-9)
        bar.update(state["task"], completed=rows, rate=f"{rate:,.0f} tok/s")

    return bar, StageProgress(start=start, advance=advance, log=lambda m: console.print(m))


def _print_score_summary(manifest: dict) -> None:
    c = manifest["counts"]
    t = Table(title=f"scores: {Path(manifest['config']['out'])}", show_header=False)
    t.add_row("model", manifest["model"]["name"])
    t.add_row("backend", f"{manifest['config']['backend']} ({manifest.get('backend_choice', '')})")
    entropy = manifest["entropy"]
    bound = f" (max error {entropy['topk_max_error_nats']:.3g} nats)" if "topk_max_error_nats" in entropy else ""
    t.add_row("entropy", entropy["method"] + bound)
    t.add_row("rows read", f"{c['rows_read']:,}")
    t.add_row("samples scored", f"{c['samples']:,}")
    t.add_row("skipped", f"{c['skipped']:,} " + (str(manifest["skipped_by_reason"]) if c["skipped"] else ""))
    t.add_row("truncated", f"{c['truncated']:,}")
    t.add_row("tokens / trainable", f"{c['tokens']:,} / {c['trainable_tokens']:,}")
    rate = manifest["scoring"]["tokens_per_s"]
    t.add_row("scoring speed", f"{rate:,.0f} tokens/s" if rate else "(nothing scored in this run)")
    t.add_row("shards", f"{len(manifest['shards'])} x part-NNNNN.parquet")
    t.add_row("wall time", f"{manifest['wall_time_s']:.1f} s")
    out.print(t)


def score_with_progress(cfg, force: bool = False) -> dict:
    from .stages import score

    bar, progress = _stage_progress("score")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return score.run(cfg, progress, force=force)
    finally:
        bar.stop()


@app.command("score")
def score_cmd(
    input: Path = typer.Argument(..., help="SFT data: .jsonl, .json (array or lines), .parquet, or a datasets save_to_disk folder."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the scores (part-NNNNN.parquet + _manifest.json)."),
    model: Optional[str] = typer.Option(None, help="Reference model: local folder or hub id. Default: built-in SmolLM2-135M-Instruct."),
    backend: str = typer.Option("auto", help="Scorer: hf (transformers), vllm, or auto (vllm with a CUDA GPU and vllm installed, else hf)."),
    format: str = typer.Option("auto", "--format", help="Input format: auto, openai, sharegpt, alpaca, prompt-completion, pairs."),
    fields: Optional[str] = typer.Option(None, help="Field names for prompt/response rows, e.g. prompt=question,response=answer[,system=S][,id=I]."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N usable rows."),
    max_length: int = typer.Option(2048, help="Truncate longer sequences to this many tokens (flagged `truncated`)."),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per forward batch (rows are length-sorted to cut padding)."),
    shard_size: int = typer.Option(512, help="Samples per output shard; the unit of resume."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    on_bad_row: str = typer.Option("skip", help="skip: count unusable rows with their reason; fail: stop at the first, naming file, row and field."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM: GPUs per model (tensor parallelism)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="vLLM: share of GPU memory for weights and KV cache [0.9]; on CPU a share of free RAM for the KV cache [default there: a fixed 1 GiB]."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="vLLM: tokens per engine step; longer rows are prefilled in chunks [vLLM default]."),
    max_model_len: Optional[int] = typer.Option(None, help="vLLM: longest sequence the engine accepts [--max-length]."),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--no-enforce-eager", help="vLLM: skip torch.compile and CUDA graphs (faster start, slower steps on GPUs) [eager on CPU, compiled on GPU]."),
    vllm_entropy: str = typer.Option("exact", help="vLLM: exact (full-vocabulary entropy via the q-curate pooling plugin) or topk (approximate, flagged in the files; used automatically when the plugin cannot serve the model)."),
    force: bool = typer.Option(False, "--force", help="Redo the run even if OUT holds finished or partial scores."),
):
    """Score every token of INPUT with a reference model: log-prob and entropy per token, as Parquet."""
    from .stages.score import ScoreConfig

    with _user_errors():
        cfg = ScoreConfig(input=str(input), out=str(out_dir), model=model, backend=backend, format=format,
                          fields=fields, limit=limit, max_length=max_length, batch_tokens=batch_tokens,
                          shard_size=shard_size, dtype=dtype, device=device, on_bad_row=on_bad_row,
                          tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                          enforce_eager=enforce_eager, vllm_entropy=vllm_entropy)
        _print_score_summary(score_with_progress(cfg, force))


def print_prune_summary(manifest: dict) -> None:
    st = manifest["stats"]
    t = Table(title=f"EU plane and pruning: {manifest['config']['out']}")
    t.add_column("quadrant")
    t.add_column("meaning")
    t.add_column("samples", justify="right")
    t.add_column("kept", justify="right")
    names = {"Q1": "harmful noise (high PPL, high entropy)", "Q2": "valuable misconception (high PPL, low entropy)",
             "Q3": "redundant knowledge (low PPL, low entropy)", "Q4": "calibration data (low PPL, high entropy)"}
    for q, meaning in names.items():
        t.add_row(q, meaning, f"{st['quadrants'][q]:,}", f"{st['kept_by_quadrant'][q]:,}")
    out.print(t)
    m = st["medians"]
    out.print(f"medians: ppl {m['ppl']:.3f}, entropy {m['ent']:.3f}")
    if st.get("thresholds"):
        th = st["thresholds"]
        out.print(f"alpha {th['alpha']:.4f}: Q2 = ppl > {th['ppl_high']:.3f} and ent <= {th['ent_low']:.3f}; "
                  f"Q4 = ppl <= {th['ppl_low']:.3f} and ent > {th['ent_high']:.3f}")
    elif st.get("alpha_per_batch"):
        a = st["alpha_per_batch"]
        out.print(f"alpha per batch: min {a['min']:.3f}, mean {a['mean']:.3f}, max {a['max']:.3f}")
    tok = st["trainable_tokens"]
    out.print(f"kept {st['K']:,} of {st['N']:,} samples ({st['sample_ratio']:.1%}): {st['selection']}")
    out.print(f"loss tokens: {tok['after']:,} of {tok['all_samples']:,} trainable ({st['loss_token_ratio']:.1%}; "
              f"{st['loss_token_ratio_in_kept']:.1%} of the kept samples' {tok['kept_samples']:,})")
    out.print(f"pruned data: {Path(manifest['config']['out']) / 'data'}/train-*.parquet")


def prune_with_log(cfg, force: bool = False) -> dict:
    from .stages import prune

    return prune.run(cfg, log=lambda m: console.print(m), force=force)


@app.command("prune")
def prune_cmd(
    scores: Path = typer.Argument(..., help="Scores folder written by `curate score`."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the pruned dataset (data/train-*.parquet, samples.parquet, stats.json)."),
    ratio: float = typer.Option(0.125, help="Fraction of samples to keep, in (0, 1]: exactly max(1, round(ratio*N))."),
    token_ratio: float = typer.Option(0.5, help="Fraction of trainable tokens kept in Q2 (misconception) samples, in (0, 1]."),
    lam: float = typer.Option(0.5, help="Context weight of the token score: (1-lam)*ppl_i + lam*(ppl_i-1 + ppl_i+1)."),
    scope: str = typer.Option("global", help="global: quantiles over the whole dataset; batch: per shuffled batch (the paper's in-training setting)."),
    batch_size: int = typer.Option(8, help="Batch size for --scope batch."),
    seed: int = typer.Option(0, help="Seed for batch shuffling and random strategies."),
    entropy_positions: str = typer.Option("response", help="Mean entropy over response tokens (paper) or all positions (official code)."),
    token_order: str = typer.Option("drop-high", help="drop-high: remove the highest-scoring tokens (paper); drop-low: the reversed ablation."),
    strategy: str = typer.Option("qtuning", help="Sample strategy: qtuning, random, ppl-high, ppl-low, entropy-high, entropy-low."),
    token_strategy: str = typer.Option("qtuning", help="Token strategy: qtuning, random, ppl (drop highest token PPL), none."),
    force: bool = typer.Option(False, "--force", help="Redo even if OUT holds this exact result."),
    report: bool = typer.Option(False, "--report", help="Also write the EU-plane report into OUT/report."),
):
    """Keep the valuable samples (Q2, Q4) to an exact budget and mask noisy tokens in Q2 samples."""
    from .stages.prune import PruneConfig

    with _user_errors():
        cfg = PruneConfig(scores=str(scores), out=str(out_dir), ratio=ratio, token_ratio=token_ratio, lam=lam,
                          scope=scope, batch_size=batch_size, seed=seed, entropy_positions=entropy_positions,
                          token_order=token_order, strategy=strategy, token_strategy=token_strategy)
        print_prune_summary(prune_with_log(cfg, force))
        if report:
            from .stages import report as report_stage

            out.print(f"report: {report_stage.run(out_dir.parent, pruned_dir=out_dir)}")


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see pipelines/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set prune.ratio=0.25 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
):
    """Run the stages a pipeline YAML describes (score -> prune [-> train], or the refresh loop) into one run folder; finished stages are skipped."""
    from .config import load_pipeline

    with _user_errors():
        p = load_pipeline(pipeline, set_)
        _run_and_print(p, force)
        out.print(f"run folder: {p.run_dir} (resolved config: {Path(p.run_dir) / 'config.yaml'})")


def _stages() -> dict:
    return {"score": score_with_progress, "prune": prune_with_log, "train": train_with_log}


def _run_and_print(p, force: bool) -> None:
    from .pipeline import run_pipeline

    results = run_pipeline(p, _stages(), force=force, log=lambda m: console.print(m))
    if "refresh" in results:
        from .stages import report

        print_refresh_summary(results["refresh"], Path(p.run_dir))
        out.print(f"report: {report.run(Path(p.run_dir))}")
        return
    _print_score_summary(results["score"])
    if "prune" in results:
        print_prune_summary(results["prune"])
    if "train" in results:
        print_train_summary(results["train"])


def train_with_log(cfg, force: bool = False) -> dict:
    from .stages import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train.run(cfg, log=lambda m: console.print(m), force=force)


def print_train_summary(manifest: dict) -> None:
    c = manifest["counts"]
    out.print(f"trained {c['steps']:,} steps on {c['samples']:,} samples ({c['loss_tokens']:,} loss tokens), "
              f"final loss {manifest['loss_history'][-1]['loss'] if manifest.get('loss_history') else 'n/a'}; "
              f"model: {manifest['config']['out']}")


@app.command("train")
def train_cmd(
    data: Path = typer.Argument(..., help="Pruned data: a `curate prune` folder (data/*.parquet) or Parquet files with input_ids and labels."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the trained model (a plain transformers folder; LoRA is merged)."),
    model: Optional[str] = typer.Option(None, help="Model to fine-tune: local folder or hub id; must share the tokenizer the data was scored with. Default: built-in SmolLM2-135M-Instruct."),
    epochs: float = typer.Option(3.0, help="Passes over the data (paper: 3)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (paper: 1e-4 with LoRA)."),
    batch_size: int = typer.Option(8, help="Samples per device batch."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation steps (paper: 8 x 4)."),
    lora_rank: int = typer.Option(8, help="LoRA rank (paper: 8); 0 = full fine-tuning."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    warmup: float = typer.Option(0.03, help="Warm-up: a fraction of the steps (< 1) or a number of steps."),
    scheduler: str = typer.Option("cosine", help="Learning-rate schedule (any transformers scheduler name)."),
    seed: int = typer.Option(0, help="Seed for shuffling and initialisation."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Retrain even if OUT holds this exact result."),
):
    """Fine-tune a model on pruned data with the built-in transformers trainer (labels = -100 are not in the loss)."""
    from .stages.train import TrainConfig

    with _user_errors():
        cfg = TrainConfig(data=str(data), out=str(out_dir), model=model, epochs=epochs, max_steps=max_steps, lr=lr,
                          batch_size=batch_size, grad_accum=grad_accum, lora_rank=lora_rank, lora_alpha=lora_alpha,
                          warmup=warmup, scheduler=scheduler, seed=seed, device=device)
        print_train_summary(train_with_log(cfg, force))


@app.command("export")
def export_cmd(
    pruned: Path = typer.Argument(..., help="A `curate prune` output folder."),
    format: str = typer.Option(..., "--format", help="llamafactory (save_to_disk for tokenized_path), axolotl (pre-tokenised JSONL), trl (Parquet with labels), jsonl (every column as JSON lines)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the exported data and its config snippet."),
    force: bool = typer.Option(False, "--force", help="Replace OUT even if it is not an earlier export."),
):
    """Write the pruned data in the shape a training framework accepts, with a ready-to-paste config."""
    from .stages import export

    with _user_errors():
        path, snippet = export.run(pruned, format, out_dir, force)
    out.print(snippet, markup=False, highlight=False)
    out.print(f"exported to {out_dir}; config written to {path}")


def print_refresh_summary(summary: dict, run_dir: Path) -> None:
    quads = ("Q1", "Q2", "Q3", "Q4")
    t = Table(title=f"refresh: {run_dir}")
    for col in ("round", "scored by", *(f"{q} (kept)" for q in quads), "kept", "loss tokens"):
        t.add_column(col, justify="left" if col == "scored by" else "right")
    for r in summary["rounds"]:
        q, k = r["quadrants"], r["kept_by_quadrant"]
        scorer = "start model" if r["round"] == 1 else f"round {r['round'] - 1} model"
        t.add_row(str(r["round"]), scorer,
                  *(f"{q[x]:,} ({k[x]:,})" for x in quads), f"{r['K']:,} / {r['N']:,}", f"{r['loss_token_ratio']:.1%}")
    out.print(t)
    for tr in summary["transitions"]:
        m = Table(title=f"quadrants, round {tr['from']} -> {tr['to']}")
        m.add_column(f"round {tr['from']}")
        for q in quads:
            m.add_column(f"{q} in {tr['to']}", justify="right")
        for q, row in tr["counts"].items():
            m.add_row(q, *(f"{row[p]:,}" for p in quads))
        out.print(m)
        out.print(f"{tr['stayed']:,} of {tr['samples']:,} samples stayed in their quadrant; "
                  f"{tr['kept_both']:,} were kept in both rounds")
    out.print(f"rounds: {run_dir}/round-NN/{{scores,pruned,model}}; summary: {run_dir / 'refresh.json'}")


@app.command("refresh")
def refresh_cmd(
    input: Path = typer.Argument(..., help="SFT data (as for `curate score`)."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder: round-NN/{scores,pruned,model}/ and refresh.json."),
    rounds: int = typer.Option(2, help="Rounds of score -> prune -> train; each round scores the FULL input with the latest checkpoint."),
    ratio: float = typer.Option(0.125, help="Fraction of samples kept per round."),
    token_ratio: float = typer.Option(0.5, help="Fraction of trainable tokens kept in Q2 samples."),
    model: Optional[str] = typer.Option(None, help="Starting model (local folder or hub id). Default: built-in SmolLM2-135M-Instruct."),
    train_cmd: Optional[str] = typer.Option(None, help="Your own training command instead of the built-in trainer; {data} (pruned folder), {model} (current model) and {out} (where to save the merged model) are filled in."),
    format: str = typer.Option("auto", "--format", help="Input format (see `curate score --help`)."),
    fields: Optional[str] = typer.Option(None, help="Field names for prompt/response rows (see `curate score --help`)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N usable rows."),
    max_length: int = typer.Option(2048, help="Truncate longer sequences to this many tokens."),
    epochs: float = typer.Option(3.0, help="Built-in trainer: epochs per round."),
    max_steps: Optional[int] = typer.Option(None, help="Built-in trainer: optimizer steps per round (overrides --epochs)."),
    lr: float = typer.Option(1e-4, help="Built-in trainer: learning rate."),
    batch_size: int = typer.Option(8, help="Built-in trainer: batch size."),
    lora_rank: int = typer.Option(8, help="Built-in trainer: LoRA rank; 0 = full fine-tuning."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage of every round."),
):
    """The dynamic loop: score with the current model, prune, train, and re-score with the new checkpoint.

    Every other stage setting (scope, lam, dtype, LoRA alpha, ...) is available in a pipeline config with a
    refresh section: see pipelines/refresh.yaml and `curate run`."""
    from pydantic import ValidationError

    from .config import Pipeline, config_errors

    with _user_errors():
        try:  # validated as one pipeline config, so every bad option is reported at once with its key path
            p = Pipeline.model_validate({
                "run_dir": str(out_dir),
                "score": {"input": str(input), "model": model, "format": format, "fields": fields, "limit": limit,
                          "max_length": max_length},
                "prune": {"ratio": ratio, "token_ratio": token_ratio},
                "train": {"epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size,
                          "lora_rank": lora_rank},
                "refresh": {"rounds": rounds, "train_cmd": train_cmd}})
        except ValidationError as e:
            raise CurateError(config_errors("curate refresh options", e)) from None
        _run_and_print(p, force)


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder holding scores/ and pruned/ (as `curate run` and `curate demo` write), or a `curate refresh` folder (last round + transition tables)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the report (default RUN_DIR/report)."),
    examples: int = typer.Option(3, help="Example samples shown per quadrant, token by token."),
):
    """Draw the EU plane (eu_plane.png, histograms.png) and write a self-contained report.html."""
    from .stages import report

    with _user_errors():
        path = report.run(run_dir, out_dir, examples)
        out.print(f"report: {path}")


@app.command("inspect")
def inspect_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder holding scores/ and pruned/."),
    id: str = typer.Option(..., "--id", help="Sample id to show."),
):
    """One sample's tokens with their masks, log-probs, entropies and pruning scores, in the terminal."""
    from .stages.inspect import sample_table

    with _user_errors():
        out.print(sample_table(run_dir, id))


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder for the demo."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
):
    """Run the whole pipeline on the built-in demo data with the built-in SmolLM2-135M model."""
    from .demo import demo_pipeline
    from .stages import report

    with _user_errors():
        _run_and_print(demo_pipeline(out_dir), force)
        report_path = report.run(out_dir)
    out.print(f"\n[bold green]Demo finished.[/] Results in {out_dir}/:\n"
              f"  scores:  {out_dir}/scores/part-*.parquet\n"
              f"  pruned:  {out_dir}/pruned/data/train-*.parquet  (load with datasets.load_dataset('parquet', ...))\n"
              f"  samples: {out_dir}/pruned/samples.parquet (every sample's ppl, ent, quadrant, fate)\n"
              f"  stats:   {out_dir}/pruned/stats.json\n"
              f"  report:  {report_path} (EU plane picture: {out_dir}/report/eu_plane.png)")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
