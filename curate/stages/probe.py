"""`curate probe INPUT --out DIR`: how much deliberately broken data does each strategy keep? Scoring only.

A copy of the data set is corrupted in documented ways (`curate.corrupt`), scored once, and every sample strategy
is run under every placement (`pruning.PLACEMENTS`) at the same budget, exactly as `curate prune` would select
(duplicates left out the same way). The table gives, per strategy and placement, the share of corrupted samples
among the kept ones, beside the input's share and the mean over many random draws; for Q-Tuning also where the
corrupted samples were kept (Q2, Q4, fills) and which corruptions got through. No training: minutes, not hours.

Layout: per corruption seed OUT/seed-S/{corrupted.jsonl (the corrupted copy), corrupted.json ({id: kind}),
scores/}, then OUT/probe.json, OUT/probe.md and OUT/_manifest.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl

from .. import io, pruning, strategies, wiring
from ..config.probe import ProbeConfig
from ..config.prune import PruneOptions
from ..config.score import SCORE_OPTIONS, ScoreOptions
from ..corrupt import corrupt, write_rows
from ..errors import CurateError
from ..executor import Job, needed_modules, run_stage, runner
from ..registry import get, register
from ..stage import Cli, Input, Manifest, Stage
from ..tables import kept_share, mean_sd
from ..triage import collect_coordinates, mark_duplicates, score_files, select

SELECTIONS = ("Q2", "Q4", "fill-Q2", "fill-Q4")


def clean_rows(cfg: ProbeConfig) -> list[dict]:
    """The usable rows of the input, canonical, in order (as `curate score` would read them)."""
    from ..formats import Sample, parse_fields, read_samples

    rows = []
    for s in read_samples(cfg.input, cfg.score.format, parse_fields(cfg.score.fields)):
        if isinstance(s, Sample):
            rows.append({"id": s.id, "messages": s.messages})
            if cfg.score.limit is not None and len(rows) >= cfg.score.limit:
                break
    return rows


def probe_table(coords: pl.DataFrame, bad: dict, cfg: ProbeConfig, seed: int = 0, signals=("ifd",)) -> dict:
    """Every registered strategy (those whose signals were scored) under every placement on the same coordinates:
    the corrupted share of what it keeps. A strategy blind to the scores is the mean of `random_seeds` draws."""
    unique = coords.filter(pl.col("duplicate_of").is_null())
    n_bad = sum(i in bad for i in unique["id"].to_list())
    result = {
        "samples": unique.height,
        "corrupted": n_bad,
        "input_share": n_bad / unique.height,
        "multi_turn_samples": int((unique["turn_ppl"].list.len() > 1).sum()),
        "placements": {},
    }
    base = {**cfg.prune.model_dump(), "ratio": cfg.ratio, "seed": seed}
    usable = [s for s in strategies.REGISTRY.values() if set(s.signals) <= set(signals)]
    for placement in pruning.PLACEMENTS:
        placed = pruning.place(unique, placement)
        rows = {}
        for strategy in usable:
            draws = []
            for draw in range(cfg.random_seeds) if strategy.random else [seed]:
                chosen, _ = select(placed, PruneOptions(**{**base, "strategy": strategy.name, "seed": draw}))
                draws.append(kept_share(chosen.filter(pl.col("selection").is_not_null())["id"].to_list(), bad))
            row = {k: sum(d[k] for d in draws) / len(draws) for k in ("kept", "corrupted", "share")}
            if strategy.name == "qtuning":
                kept = chosen.filter(pl.col("selection").is_not_null())
                row["by_selection"] = {
                    s: {
                        "kept": int((kept["selection"] == s).sum()),
                        "corrupted": sum(i in bad for i in kept.filter(pl.col("selection") == s)["id"].to_list()),
                    }
                    for s in SELECTIONS
                }
                kinds = Counter(bad[i] for i in kept["id"].to_list() if i in bad)
                row["kept_by_kind"] = dict(sorted(kinds.items()))
            rows[strategy.name] = row
        result["placements"][placement] = rows
    result["corrupted_by_kind"] = dict(sorted(Counter(bad[i] for i in unique["id"].to_list() if i in bad).items()))
    return result


def combine(per_seed: dict[int, dict]) -> dict:
    """The seeds' tables as one: per placement and strategy the mean and sd of the corrupted share over the
    corruption seeds, beside the input's share."""
    tables = list(per_seed.values())
    first = tables[0]
    return {
        "seeds": list(per_seed),
        "samples": first["samples"],
        "multi_turn_samples": first["multi_turn_samples"],
        "corrupted": mean_sd([t["corrupted"] for t in tables]),
        "input_share": mean_sd([t["input_share"] for t in tables]),
        "placements": {
            placement: {
                name: {"kept": row["kept"], **mean_sd([t["placements"][placement][name]["share"] for t in tables])}
                for name, row in rows.items()
            }
            for placement, rows in first["placements"].items()
        },
        "per_seed": {str(seed): t for seed, t in per_seed.items()},
    }


def pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f}%" + (f" ± {100 * stat['sd']:.1f}" if stat["sd"] else "")


def skipped_line(r: dict) -> list[str]:
    """The rows each seed's scoring skipped (with their reasons), as the table's second paragraph; none: nothing."""
    per_seed = {seed: t.get("skipped", {}) for seed, t in r["per_seed"].items()}
    if not any(per_seed.values()):
        return []
    said = "; ".join(
        f"seed {seed}: " + ", ".join(f"{n:,} {reason}" for reason, n in sorted(skips.items()))
        for seed, skips in per_seed.items()
        if skips
    )
    return [f"Rows scoring skipped (not in the table): {said}.", ""]


def changed_line(r: dict) -> list[str]:
    """How many of the distinct samples each seed's corruption really changed, by kind: the table's noise."""
    said = "; ".join(
        f"seed {seed}: {t['corrupted']:,}" + "".join(f", {n:,} {kind}" for kind, n in t["corrupted_by_kind"].items())
        for seed, t in r["per_seed"].items()
    )
    return [f"Corrupted samples (changed into a conversation the input does not hold): {said}.", ""]


def probe_markdown(cfg: ProbeConfig, r: dict) -> str:
    placements = list(r["placements"])
    lines = [
        f"Input: {cfg.input}; {r['samples']:,} distinct samples ({r['multi_turn_samples']:,} multi-turn), "
        f"{pct(r['input_share'])} corrupted; budget {cfg.ratio:g}; corruption seeds {', '.join(map(str, r['seeds']))} "
        f"(mean ± sd over them); random: mean of {cfg.random_seeds} draws per seed.",
        "",
        *changed_line(r),
        *skipped_line(r),
        "Share of corrupted samples among the kept ones (lower is better):",
        "",
        "| strategy | " + " | ".join(placements) + " |",
        "|---|" + "---:|" * len(placements),
        "| (the input) | " + " | ".join(pct(r["input_share"]) for _ in placements) + " |",
    ]
    for name in r["placements"][placements[0]]:
        lines.append(f"| {name} | " + " | ".join(pct(r["placements"][p][name]) for p in placements) + " |")
    lines += ["", "Q-Tuning, corrupted / kept by selection (per seed):", "", "| seed | placement | "]
    lines[-1] += " | ".join(SELECTIONS) + " |"
    lines.append("|---|---|" + "---:|" * len(SELECTIONS))
    for seed, t in r["per_seed"].items():
        for placement, rows in t["placements"].items():
            sel = rows["qtuning"]["by_selection"]
            lines.append(
                f"| {seed} | {placement} | "
                + " | ".join(f"{sel[s]['corrupted']}/{sel[s]['kept']}" for s in SELECTIONS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def score_options(cfg: ProbeConfig):
    """The probe's scoring: every strategy is tabled, IFD included, so the answers are scored alone too."""
    return cfg.score.model_copy(update={"signals": sorted({*cfg.score.signals, "ifd"})})


def needs(cfg: ProbeConfig) -> tuple[str, ...]:
    out = Path(cfg.out)
    scoring = wiring.written_rows_config(score_options(cfg), out / "corrupted.jsonl", out / "scores")
    return needed_modules(get("score"), scoring)


def compute(job: Job) -> dict:
    """Per corruption seed: the corrupted copy, its scores (a stage of its own: a probe killed after scoring resumes
    at the selection) and the table; then the seeds' tables as one."""
    cfg, out, reporter, force = job.cfg, job.out, job.reporter, job.force
    options = score_options(cfg)
    clean = clean_rows(cfg)
    per_seed = {}
    for seed in cfg.seeds:
        folder = out / f"seed-{seed}"
        rows, bad = corrupt(clean, cfg.fraction, seed, tuple(cfg.corruptions))
        if not bad:
            raise CurateError(f"{cfg.input}: no row can be corrupted with {', '.join(cfg.corruptions)}")
        reporter.log(f"seed {seed}: corrupted {len(bad):,} of {len(rows):,} rows: {dict(Counter(bad.values()))}")
        write_rows(folder / "corrupted.jsonl", rows)
        io.write_json_atomic(folder / "corrupted.json", bad)
        scoring = wiring.written_rows_config(options, folder / "corrupted.jsonl", folder / "scores")
        scored = run_stage("score", scoring, reporter, force)
        coords = collect_coordinates(
            score_files(folder / "scores", scored),
            cfg.prune,
            scored.vocab_size,
            scored.score_positions,
            scored.signals,
        )
        coords = mark_duplicates(coords, cfg.prune.keep_duplicates)
        per_seed[seed] = probe_table(coords, bad, cfg, seed, scored.signals)
        per_seed[seed]["skipped"] = scored.skipped_by_reason  # rows scoring left out: shown, never hidden
    result = combine(per_seed)
    io.write_json_atomic(out / "probe.json", result)
    io.write_bytes_atomic(out / "probe.md", probe_markdown(cfg, result).encode())
    return {"result": result}


class ProbeResult(Manifest):
    result: dict


def summary(m: ProbeResult) -> list:
    out = Path(m.config["out"])
    return [(out / "probe.md").read_text(), f"results: {out / 'probe.md'}, probe.json"]


STAGE = register(
    Stage(
        name="probe",
        produces="probe",
        config=ProbeConfig,
        doc="How much broken data does each strategy keep? Corrupt a copy of INPUT (once per corruption seed), score "
        "it (the answers alone too, for IFD), select with every registered strategy and placement at the same budget, "
        "and tabulate the corrupted share kept, mean and sd over the seeds (no training: minutes). Writes "
        "OUT/probe.md, OUT/probe.json, and per seed OUT/seed-S/ with the corrupted copy, its ids and its scores.",
        compute=compute,
        inputs=(Input("input", data=True, hint="the data set to probe"),),
        outputs=("seed-*/corrupted.jsonl", "seed-*/corrupted.json", "probe.json", "probe.md"),
        needs=needs,
        walks=True,  # its scoring runs are stages: a rerun walks them, each reusing its finished result
        result=ProbeResult,
        summary=summary,
        cli=Cli(
            arguments=("input",),
            sections=(
                (None, ProbeConfig, ("input", "out", "fraction", "corruptions", "ratio", "seeds", "random_seeds")),
                ("score", ScoreOptions, SCORE_OPTIONS),
                ("prune", PruneOptions, ("entropy_positions", "fill", "keep_duplicates")),
            ),
        ),
    )
)
run = runner(STAGE)
