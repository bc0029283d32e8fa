"""`curate experiment CONFIG.yaml`: does the pruning pay off? The paper's comparison on a user's own data.

One base model, one training set, one evaluation set. The training set is scored once; every static arm (random
samples x random tokens, Q-Tuning, Q-Tuning samples only, random samples whole, and the sample baselines) is pruned
from the same scores; full data and the in-trainer arms (dynamic-qtuning, dynamic-paper, dynamic-random) train on every
scored sample; the refresh arm re-scores and prunes every epoch. All train with identical settings and seeds (at equal
epochs, or at full data's steps: the paper's protocol) and are evaluated on the same held-out rows (answer NLL and
GSM8K exact match). The robustness part corrupts a share of the training rows (`curate.corrupt`: another row's
answer, on multi-turn rows another reply or changed tool-call arguments) and reports, per strategy, how many
corrupted rows each one keeps, and how the trained arms fare. Every step is a stage with its own manifest, and the
experiment is one too (the executor's lifecycle: inputs verified, a fingerprint, a lock, the manifest last), so an
interrupted experiment resumes where it stopped and a finished arm is not retrained.

Layout: RUN/scores, RUN/full-data (every scored sample, for full data and the in-trainer arms),
RUN/arms/ARM/seed-S/{pruned,model,eval} (a refresh arm: {refresh,eval}), RUN/base/eval, RUN/robustness/{data/train-
corrupted.jsonl,scores,full-data,strategies,arms}, RUN/results.{json,md,png} and RUN/_manifest.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .. import io, strategies, wiring
from ..arms import arm_kind, arm_settings
from ..config.evaluate import EvaluateConfig
from ..config.experiment import Budget, ExperimentConfig
from ..config.prune import PruneConfig
from ..config.refresh import RefreshConfig
from ..config.score import ScoreOptions
from ..config.selection import SelectionOptions
from ..config.train import TrainConfig
from ..corrupt import corrupt, write_rows
from ..executor import Job, needed_modules, run_stage, runner
from ..progress import Reporter
from ..registry import get, register
from ..stage import Cli, Input, Manifest, Stage
from ..tables import kept_share, mean_sd, pyplot


def arm_name(arm: str, budget: Budget | None) -> str:
    if arm == "full" or budget is None:
        return arm
    return f"{arm}-{budget.ratio:g}x{budget.token_ratio:g}"


def planned_arms(cfg: ExperimentConfig) -> list[tuple[str, str, Budget | None]]:
    """(name, arm, budget) of every arm, each once (`full` does not depend on the budget)."""
    arms, seen = [], set()
    for budget in cfg.budgets:
        for arm in budget.arms:
            name = arm_name(arm, budget)
            if name not in seen:
                seen.add(name)
                arms.append((name, arm, None if arm == "full" else budget))
    return arms


def prune_config(
    cfg: ExperimentConfig, arm: str, budget: Budget | None, seed: int, scores: Path, out: Path
) -> PruneConfig:
    ratio, token_ratio = (1.0, 1.0) if budget is None else (budget.ratio, budget.token_ratio)
    changes = {**arm_settings(arm), "ratio": ratio, "token_ratio": token_ratio, "seed": seed}
    return wiring.prune_config(cfg.prune, scores, out, **changes)


def selection_options(cfg: ExperimentConfig, arm: str, budget: Budget) -> SelectionOptions:
    """What a dynamic arm selects in each micro-batch: the prune section's rule, the arm's settings, the budget."""
    shared = {k: v for k, v in cfg.prune.model_dump().items() if k in SelectionOptions.model_fields}
    changes = {**arm_settings(arm), "ratio": budget.ratio, "token_ratio": budget.token_ratio}
    return SelectionOptions.model_validate({**shared, **changes})


def full_steps(cfg: ExperimentConfig, n_full: int) -> int:
    """Full data's optimizer steps: train.max_steps, else train.epochs passes over its n_full rows, counted as the
    Trainer counts them."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_full / cfg.train.batch_size) / cfg.train.grad_accum))
    return math.ceil(cfg.train.epochs * per_epoch)


def train_config(
    cfg: ExperimentConfig, seed: int, data: Path, out: Path, n_full: int, share: float = 1.0, **changes
) -> TrainConfig:
    """An arm's training: equal epochs, or (equal: steps) full data's steps, which a subset of `share` of the rows
    reaches with its share of the batch (static_steps: batch) or with more passes (static_steps: epochs)."""
    if cfg.equal == "epochs":
        changes.setdefault("max_steps", None)
    else:
        changes.setdefault("max_steps", full_steps(cfg, n_full))
        if share < 1 and cfg.static_steps == "batch":
            changes.setdefault("batch_size", max(1, round(cfg.train.batch_size * share)))
    return wiring.train_config(cfg.train, cfg.prune, data, out, cfg.score.model, seed=seed, **changes)


def evaluate(cfg: ExperimentConfig, model: str, out: Path, reporter: Reporter, force: bool) -> dict:
    """Answer NLL and exact match of one model folder (or hub id) on the experiment's held-out rows."""
    return run_stage("evaluate", EvaluateConfig(**cfg.eval.model_dump(), model=model, out=str(out)), reporter, force)


# ---------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class TrainingSet:
    """The scored training set an arm starts from, and its full-data form (every distinct sample, whole) that the
    full and dynamic arms train on; n_full rows set full data's steps."""

    data: str  # the rows, as `curate score` reads them with `score` (the refresh arm scores them every round)
    score: ScoreOptions
    scores: Path
    full: Path
    n_full: int


def training_set(
    cfg: ExperimentConfig, data: str, options: ScoreOptions, scores: Path, reporter: Reporter, force: bool
) -> TrainingSet:
    full = scores.parent / "full-data"
    pruned = run_stage("prune", prune_config(cfg, "full", None, cfg.seeds[0], scores, full), reporter, force)
    return TrainingSet(data, options, scores, full, pruned["stats"]["K"])


def run_arm(
    cfg: ExperimentConfig,
    arm: str,
    budget: Budget | None,
    ts: TrainingSet,
    folder: Path,
    reporter: Reporter,
    force: bool,
) -> list[dict]:
    """One arm, once per seed (folder/seed-S): its training (as its kind says), then the evaluation; what it cost."""
    runs = []
    for seed in cfg.seeds:
        out = folder / f"seed-{seed}"
        kind = "full" if arm == "full" else arm_kind(arm)
        if kind == "refresh":
            trained, cost = refresh_arm(cfg, arm, budget, seed, ts, out, reporter, force)
            selection = {}
        else:
            data, share, changes, selection = ts.full, 1.0, {}, {}
            if kind == "dynamic":
                changes = {"dynamic": True, "selection": selection_options(cfg, arm, budget)}
            elif kind == "static":
                pruned = run_stage(
                    "prune", prune_config(cfg, arm, budget, seed, ts.scores, out / "pruned"), reporter, force
                )
                data, share = out / "pruned", pruned["stats"]["K"] / ts.n_full
                selection = pruned["stats"]["selection"]
            options = train_config(cfg, seed, data, out / "model", ts.n_full, share, **changes)
            trained = run_stage("train", options, reporter, force)
            cost = train_cost(trained)
        evaluated = evaluate(cfg, trained["model"]["path"], out / "eval", reporter, force)
        release_memory()
        counts = trained["counts"]
        runs.append(
            {
                "seed": seed,
                "kind": kind,
                "samples": counts["samples"],
                "data": trained["config"]["data"],  # what the (last) training read
                "data_loss_tokens": counts["loss_tokens"],  # the loss tokens of that data, once
                "batch_size": trained["config"]["batch_size"],
                **cost,
                "nll": evaluated["result"]["nll"]["nll"],
                "final_nll": evaluated["result"]["nll"].get("final_nll"),
                "em": evaluated["result"].get("em", {}).get("em"),
                "nll_rows": evaluated["result"]["nll_rows"],
                "em_rows": evaluated["result"]["em_rows"],
                "selection": selection,  # a static subset's kept samples by selection
                "kept_by_selection": trained.kept_by_selection,  # in the micro-batches, over the run
                "folder": str(out),
            }
        )
    return runs


def release_memory() -> None:
    """Give what the finished stages freed back to the system: many arms trained in one process would otherwise hold
    the peak of every model and batch they loaded (cycles wait for the collector; glibc keeps freed blocks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def train_cost(trained) -> dict:
    """What a training run computed: optimizer steps, tokens through the forward pass and in the loss (over all
    steps), and its wall time."""
    c = trained["counts"]
    return {
        "steps": c["steps"],
        "forward_tokens": c.get("forward_tokens", 0),
        "loss_tokens": c.get("trained_loss_tokens", 0),
        "seconds": trained["wall_time_s"],
    }


def refresh_arm(cfg, arm, budget, seed, ts, out, reporter, force) -> tuple:
    """The offline twin of the in-trainer protocol: one round per epoch, each scoring the whole training set with the
    latest checkpoint, pruning it and training one epoch's share of full data's steps on the kept samples."""
    rounds = max(1, math.ceil(cfg.train.epochs))
    if cfg.equal == "epochs" and rounds != cfg.train.epochs:
        reporter.log(
            f"{arm}: {rounds} rounds of one epoch each, where the other arms train {cfg.train.epochs:g} epochs"
        )
    ratio = budget.ratio
    per_round = {"epochs": 1.0, "max_steps": None}
    if cfg.equal == "steps":
        total = full_steps(cfg, ts.n_full)
        per_round["max_steps"] = max(1, total // rounds)
        if total % rounds:  # one training per round: its steps are the same every round
            reporter.log(
                f"{arm}: {rounds} rounds of {per_round['max_steps']} steps, where full data trains {total} (its "
                "steps do not split into one round per epoch)"
            )
        if cfg.static_steps == "batch":
            per_round["batch_size"] = max(1, round(cfg.train.batch_size * ratio))
    settings = {**arm_settings(arm), "ratio": ratio, "token_ratio": budget.token_ratio, "seed": seed}
    loop = RefreshConfig(
        input=ts.data,
        out=str(out / "refresh"),
        rounds=rounds,
        score=ts.score.model_dump(),
        prune={**cfg.prune.model_dump(), **settings},
        train={**cfg.train.model_dump(), **per_round, "seed": seed},
    )
    run_stage("refresh", loop, reporter, force)
    cost = {"steps": 0, "forward_tokens": 0, "loss_tokens": 0, "seconds": 0.0}
    for r in range(1, rounds + 1):
        d = wiring.round_dir(out / "refresh", r)
        scored, pruned, trained = (
            get(stage).result.model_validate(io.read_manifest(d / name))
            for stage, name in (("score", "scores"), ("prune", "pruned"), ("train", "model"))
        )
        round_cost = train_cost(trained)
        for key in ("steps", "forward_tokens", "loss_tokens"):
            cost[key] += round_cost[key]
        cost["forward_tokens"] += scored["counts"]["tokens"]  # scoring the whole set with the latest checkpoint
        cost["seconds"] += round_cost["seconds"] + scored["wall_time_s"] + pruned["wall_time_s"]
    return trained, cost


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of NLL and EM (sd 0 for one seed)."""
    out = {}
    for key in ("nll", "final_nll", "em"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            out[key] = mean_sd(values)
    return out


def robustness(cfg: ExperimentConfig, clean_rows: list[dict], reporter: Reporter, force: bool) -> dict:
    rc, folder = cfg.robustness, Path(cfg.run_dir) / "robustness"
    rows, corrupted = corrupt(clean_rows, rc.fraction, rc.seed)
    bad_ids = sorted(corrupted)
    data = folder / CORRUPTED
    if not data.exists() or force:
        write_rows(data, rows)
    options = wiring.written_rows_options(cfg.score)
    scored = run_stage("score", wiring.score_config(options, str(data), folder / "scores"), reporter, force)
    ts = training_set(cfg, str(data), options, folder / "scores", reporter, force)
    budget = Budget(ratio=rc.ratio, token_ratio=rc.token_ratio)
    bad = set(bad_ids)
    kept = {}
    scored_signals = set(cfg.score.signals)
    for strategy in [s.name for s in strategies.REGISTRY.values() if set(s.signals) <= scored_signals]:
        d = folder / "strategies" / strategy
        run_stage("prune", prune_config(cfg, strategy, budget, cfg.seeds[0], folder / "scores", d), reporter, force)
        ids = (
            pl.read_parquet(d / "samples.parquet", columns=["id", "kept"], glob=False)
            .filter(pl.col("kept"))["id"]
            .to_list()
        )
        kept[strategy] = kept_share(ids, bad)
    trained = {}
    for arm in rc.train_arms:
        name = arm_name(arm, None if arm == "full" else budget)
        trained[name] = run_arm(
            cfg, arm, None if arm == "full" else budget, ts, folder / "arms" / name, reporter, force
        )
    return {
        "fraction": rc.fraction,
        "corrupted_rows": len(bad_ids),
        "rows": scored["counts"]["samples"],
        "budget": budget.model_dump(),
        "kept": kept,
        "trained": {name: {"runs": runs, **summarise(runs)} for name, runs in trained.items()},
    }


CORRUPTED = "data/train-corrupted.jsonl"  # in RUN/robustness: the corrupted copy of the training set


def needs(cfg: ExperimentConfig) -> tuple[str, ...]:
    score_cfg = wiring.score_config(cfg.score, cfg.train_data, Path(cfg.run_dir) / "scores")
    return (*needed_modules(get("score"), score_cfg), *needed_modules(get("train"), cfg.train), "matplotlib")


def compute(job: Job) -> dict:
    """Score once, then each arm's prune, train and evaluation (stages of their own, each reusing its finished
    result), then the tables; the manifest's fields."""
    cfg, reporter, force = job.cfg, job.reporter, job.force
    folder = Path(cfg.run_dir)
    score_cfg = wiring.score_config(cfg.score, cfg.train_data, folder / "scores")
    scored = run_stage("score", score_cfg, reporter, force)
    ts = training_set(cfg, cfg.train_data, cfg.score, folder / "scores", reporter, force)
    base_model = cfg.train.model or cfg.score.model or "builtin"
    baseline = evaluate(cfg, base_model, folder / "base" / "eval", reporter, force)["result"]
    arms = {}
    for name, arm, budget in planned_arms(cfg):
        runs = run_arm(cfg, arm, budget, ts, folder / "arms" / name, reporter, force)
        arms[name] = {
            "arm": arm,
            "budget": budget.model_dump(exclude={"arms"}) if budget else None,
            "runs": runs,
            **summarise(runs),
        }
    results = {
        "base": {
            "nll": baseline["nll"]["nll"],
            "final_nll": baseline["nll"].get("final_nll"),
            "em": baseline.get("em", {}).get("em"),
        },
        "arms": arms,
        "train_rows": scored["counts"]["samples"],
        "eval_rows": baseline["rows"],
        "full_rows": ts.n_full,
        "seeds": cfg.seeds,
        "equal": cfg.equal,
        "static_steps": cfg.static_steps,
    }
    if cfg.robustness:
        clean = [{"id": r["id"], "messages": r["messages"]} for r in training_rows(folder / "scores", scored)]
        results["robustness"] = robustness(cfg, clean, reporter, force)
    results["wall_time_s"] = round(time.time() - job.started, 1)
    io.write_json_atomic(folder / "results.json", results)
    io.write_bytes_atomic(folder / "results.md", results_markdown(cfg, results).encode())
    plot_results(results, folder / "results.png")
    return {"results": results}


def training_rows(scores: Path, manifest: dict) -> list[dict]:
    """The scored training rows (id and conversation), in order: the set the robustness part corrupts."""
    import pyarrow.parquet as pq

    return pq.read_table([scores / f["name"] for f in manifest["files"]], columns=["id", "messages"]).to_pylist()


# ---------------------------------------------------------------- reporting


def _fmt(stat: dict | None, key: str, scale: float = 1.0, digits: int = 3) -> str:
    if not stat or key not in stat:
        return "n/a"
    mean, sd = stat[key]["mean"] * scale, stat[key]["sd"] * scale
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def results_markdown(cfg: ExperimentConfig, results: dict) -> str:
    n_seeds = len(results["seeds"])
    protocol = "equal epochs"
    if results["equal"] == "steps":
        how = "a smaller batch" if results.get("static_steps") == "batch" else "more epochs"
        protocol = f"equal steps (static subsets: {how})"
    lines = [
        f"Training rows: {results['train_rows']:,}; evaluation rows: {results['eval_rows']['nll']:,} (NLL), "
        f"{results['eval_rows']['em']:,} (exact match); seeds: {results['seeds']}; {protocol}"
        + (" (mean ± sd over seeds)" if n_seeds > 1 else "")
        + ". Cost columns over the whole training run: forward tokens (refresh: its scoring passes too), loss "
        "tokens (each counted every time it trains), wall time (mean over seeds).",
        "",
        "| arm | trains | samples | batch | steps | forward tokens | loss tokens | minutes | answer NLL (lower is "
        "better) | final-answer NLL | GSM8K EM % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| base model (no training) | | | | | | | | {results['base']['nll']:.3f} | "
        + (f"{results['base']['final_nll']:.3f} | " if results["base"].get("final_nll") is not None else "n/a | ")
        + (f"{100 * results['base']['em']:.1f} |" if results["base"]["em"] is not None else "n/a |"),
    ]
    for name, a in results["arms"].items():
        r0 = a["runs"][0]
        minutes = np.mean([r.get("seconds", r.get("train_seconds", 0)) for r in a["runs"]]) / 60
        lines.append(
            f"| {name} | {r0.get('kind', '')} | {r0['samples']:,} | {r0.get('batch_size', '')} | {r0['steps']:,} | "
            f"{r0.get('forward_tokens', 0):,} | {r0['loss_tokens']:,} | {minutes:.1f} | {_fmt(a, 'nll')} | "
            f"{_fmt(a, 'final_nll')} | {_fmt(a, 'em', 100, 1)} |"
        )
    rb = results.get("robustness")
    if rb:
        lines += [
            "",
            f"Robustness: {rb['corrupted_rows']:,} of {rb['rows']:,} training rows corrupted (each given "
            f"another row's answer); budget {rb['budget']['ratio']:g} of samples x {rb['budget']['token_ratio']:g} "
            "of tokens.",
            "",
            "| strategy | kept | corrupted among kept | share |",
            "|---|---:|---:|---:|",
        ]
        for s, k in rb["kept"].items():
            lines.append(f"| {s} | {k['kept']:,} | {k['corrupted']:,} | {100 * k['share']:.1f}% |")
        expected = 100 * rb["corrupted_rows"] / rb["rows"]
        lines += [
            "",
            f"(A strategy blind to the scores keeps about {expected:.0f}% corrupted rows.)",
            "",
            "| trained on the corrupted set | answer NLL | GSM8K EM % |",
            "|---|---:|---:|",
        ]
        for name, t in rb["trained"].items():
            lines.append(f"| {name} | {_fmt(t, 'nll')} | {_fmt(t, 'em', 100, 1)} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    plt = pyplot()
    names = ["base"] + list(results["arms"])
    stats = [
        {"nll": {"mean": results["base"]["nll"], "sd": 0.0}, "em": {"mean": results["base"]["em"] or 0.0, "sd": 0.0}}
    ] + list(results["arms"].values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    for ax, key, label, scale in (
        (axes[0], "nll", "answer NLL (nats/token), lower is better", 1.0),
        (axes[1], "em", "GSM8K exact match (%)", 100.0),
    ):
        means = [scale * (s.get(key) or {"mean": math.nan})["mean"] for s in stats]
        sds = [scale * (s.get(key) or {"sd": 0.0})["sd"] for s in stats]
        colours = ["#999999"] + ["#d62728" if "qtuning" in n else "#1f77b4" for n in names[1:]]
        ax.bar(range(len(names)), means, yerr=sds, color=colours, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if key == "nll":
            finite = [m for m in means if math.isfinite(m)]
            ax.set_ylim(min(finite) * 0.97, max(finite) * 1.02)
    fig.suptitle("q-curate experiment: one arm per bar (error bars: sd over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class ExperimentResult(Manifest):
    results: dict


def summary(m: ExperimentResult) -> list:
    folder = Path(m.config["run_dir"])
    return [
        (folder / "results.md").read_text(),
        f"results: {folder}/results.json, results.md, results.png ({m.results['wall_time_s'] / 60:.1f} min)",
    ]


STAGE = register(
    Stage(
        name="experiment",
        produces="experiment",
        config=ExperimentConfig,
        doc="Does the pruning pay off? Score once, build every arm from the same scores (static subsets, full data, "
        "selection inside the trainer, refresh rounds), train each identically, evaluate; finished arms are not "
        "retrained.",
        compute=compute,
        inputs=(
            Input("train_data", data=True, hint="the training set"),
            Input("eval.data", data=True, hint="the held-out rows"),
        ),
        outputs=("results.json", "results.md", "results.png", f"robustness/{CORRUPTED}"),
        needs=needs,
        walks=True,  # its arms are stages: a rerun walks them, each reusing its finished result
        out=lambda cfg: cfg.run_dir,
        result=ExperimentResult,
        summary=summary,
        cli=Cli(file="Experiment YAML (see pipelines/experiments/)"),
    )
)
run = runner(STAGE)
