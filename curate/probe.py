"""`curate probe INPUT --out DIR`: how much deliberately broken data does each strategy keep? Scoring only.

A copy of the data set is corrupted in documented ways (`curate.corrupt`), scored once, and every sample strategy
is run under every placement (`pruning.PLACEMENTS`) at the same budget, exactly as `curate prune` would select
(duplicates left out the same way). The table gives, per strategy and placement, the share of corrupted samples
among the kept ones, beside the input's share and the mean over many random draws; for Q-Tuning also where the
corrupted samples were kept (Q2, Q4, fills) and which corruptions got through. No training: minutes, not hours.

Layout: OUT/corrupted.jsonl (the corrupted copy), OUT/corrupted.json ({id: kind}), OUT/scores/, OUT/probe.json,
OUT/probe.md and OUT/_manifest.json.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import polars as pl

from . import __version__, io, pruning, wiring
from .config import ProbeConfig, PruneConfig
from .corrupt import corrupt
from .executor import require_stage
from .experiment import write_rows
from .progress import Reporter
from .stages import prune, score

SELECTIONS = ("Q2", "Q4", "fill-Q2", "fill-Q4")


def clean_rows(cfg: ProbeConfig) -> list[dict]:
    """The usable rows of the input, canonical, in order (as `curate score` would read them)."""
    from .formats import Sample, parse_fields, read_samples

    rows = []
    for s in read_samples(cfg.input, cfg.score.format, parse_fields(cfg.score.fields)):
        if isinstance(s, Sample):
            rows.append({"id": s.id, "messages": s.messages})
            if cfg.score.limit is not None and len(rows) >= cfg.score.limit:
                break
    return rows


def kept_share(chosen: pl.DataFrame, bad: dict) -> dict:
    kept = chosen.filter(pl.col("selection").is_not_null())
    ids = kept["id"].to_list()
    hit = [i for i in ids if i in bad]
    return {"kept": len(ids), "corrupted": len(hit), "share": len(hit) / len(ids) if ids else 0.0}


def probe_table(coords: pl.DataFrame, bad: dict, cfg: ProbeConfig) -> dict:
    """Every strategy under every placement on the same coordinates: the corrupted share of what it keeps."""
    unique = coords.filter(pl.col("duplicate_of").is_null())
    n_bad = sum(i in bad for i in unique["id"].to_list())
    result = {
        "samples": unique.height,
        "corrupted": n_bad,
        "input_share": n_bad / unique.height,
        "multi_turn_samples": int((unique["turn_ppl"].list.len() > 1).sum()),
        "placements": {},
    }
    base = {**cfg.prune.model_dump(), "ratio": cfg.ratio, "seed": cfg.seed}
    for placement in pruning.PLACEMENTS:
        placed = pruning.place(unique, placement)
        rows = {}
        for strategy in pruning.SAMPLE_STRATEGIES:
            seeds = range(cfg.random_seeds) if strategy == "random" else [cfg.seed]
            draws = []
            for seed in seeds:
                chosen, _ = prune.select(
                    placed, PruneConfig(**{**base, "strategy": strategy, "seed": seed}, scores="", out="")
                )
                draws.append(kept_share(chosen, bad))
            row = {k: sum(d[k] for d in draws) / len(draws) for k in ("kept", "corrupted", "share")}
            if strategy == "qtuning":
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
                row["by_quadrant"] = {
                    q: {
                        "samples": int((chosen["quadrant"] == q).sum()),
                        "corrupted": sum(i in bad for i in chosen.filter(pl.col("quadrant") == q)["id"].to_list()),
                    }
                    for q in ("Q1", "Q2", "Q3", "Q4")
                }
            rows[strategy] = row
        result["placements"][placement] = rows
    result["corrupted_by_kind"] = dict(sorted(Counter(bad[i] for i in unique["id"].to_list() if i in bad).items()))
    return result


def probe_markdown(cfg: ProbeConfig, r: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in r["corrupted_by_kind"].items())
    lines = [
        f"Input: {cfg.input}; {r['samples']:,} distinct samples ({r['multi_turn_samples']:,} multi-turn), "
        f"{r['corrupted']:,} corrupted ({100 * r['input_share']:.1f}%: {kinds}); budget {cfg.ratio:g}; "
        f"random: mean of {cfg.random_seeds} draws.",
        "",
        "| placement | strategy | kept | corrupted among kept | share |",
        "|---|---|---:|---:|---:|",
    ]
    for placement, rows in r["placements"].items():
        for strategy, row in rows.items():
            lines.append(
                f"| {placement} | {strategy} | {row['kept']:,.0f} | {row['corrupted']:,.1f} | "
                f"{100 * row['share']:.1f}% |"
            )
    lines += ["", "Q-Tuning, corrupted / kept by selection:", "", "| placement | " + " | ".join(SELECTIONS) + " |"]
    lines.append("|---|" + "---:|" * len(SELECTIONS))
    for placement, rows in r["placements"].items():
        sel = rows["qtuning"]["by_selection"]
        lines.append(
            f"| {placement} | " + " | ".join(f"{sel[s]['corrupted']}/{sel[s]['kept']}" for s in SELECTIONS) + " |"
        )
    return "\n".join(lines) + "\n"


def run(cfg: ProbeConfig, reporter: Reporter | None = None, force: bool = False) -> dict:
    reporter = reporter or Reporter()
    started = time.time()
    out = Path(cfg.out)
    score_cfg = wiring.written_rows_config(cfg.score, out / "corrupted.jsonl", out / "scores")
    require_stage("score", score_cfg)
    require_stage("prune")
    with io.locked(out, reporter.log):
        rows, bad = corrupt(clean_rows(cfg), cfg.fraction, cfg.seed, tuple(cfg.corruptions))
        if not bad:
            from .errors import CurateError

            raise CurateError(f"{cfg.input}: no row can be corrupted with {', '.join(cfg.corruptions)}")
        reporter.log(f"corrupted {len(bad):,} of {len(rows):,} rows: {dict(Counter(bad.values()))}")
        write_rows(out / "corrupted.jsonl", rows)
        io.write_json_atomic(out / "corrupted.json", bad)
        scored = score.run(score_cfg, reporter, force)
        prune_cfg = PruneConfig(**cfg.prune.model_dump(), scores=str(out / "scores"), out="")
        coords = prune.collect_coordinates(
            prune.score_files(out / "scores", scored),
            prune_cfg,
            scored.get("vocab_size"),
            scored.get("score_positions", "all"),
        )
        coords = prune.mark_duplicates(coords, prune_cfg.keep_duplicates)
        result = probe_table(coords, bad, cfg)
        io.write_json_atomic(out / "probe.json", result)
        io.write_bytes_atomic(out / "probe.md", probe_markdown(cfg, result).encode())
        files = [io.file_entry(out, n) for n in ("corrupted.jsonl", "corrupted.json", "probe.json", "probe.md")]
        return io.write_manifest(
            out,
            "probe",
            io.fingerprint_config({"config": cfg.model_dump(), "version": __version__}),
            started,
            files=files,
            config=cfg.model_dump(),
            result=result,
        )
