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

import numpy as np
import polars as pl

from . import __version__, io, pruning, strategies, wiring
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
                chosen, _ = prune.select(
                    placed, PruneConfig(**{**base, "strategy": strategy.name, "seed": draw}, scores="", out="")
                )
                draws.append(kept_share(chosen, bad))
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


def mean_sd(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


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


def probe_markdown(cfg: ProbeConfig, r: dict) -> str:
    placements = list(r["placements"])
    lines = [
        f"Input: {cfg.input}; {r['samples']:,} distinct samples ({r['multi_turn_samples']:,} multi-turn), "
        f"{pct(r['input_share'])} corrupted; budget {cfg.ratio:g}; corruption seeds {', '.join(map(str, r['seeds']))} "
        f"(mean ± sd over them); random: mean of {cfg.random_seeds} draws per seed.",
        "",
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


def run(cfg: ProbeConfig, reporter: Reporter | None = None, force: bool = False) -> dict:
    reporter = reporter or Reporter()
    started = time.time()
    out = Path(cfg.out)
    # every strategy is tabled, IFD included: the answers are scored alone too
    options = cfg.score.model_copy(update={"signals": sorted({*cfg.score.signals, "ifd"})})
    require_stage("score", wiring.written_rows_config(options, out / "corrupted.jsonl", out / "scores"))
    require_stage("prune")
    with io.locked(out, reporter.log):
        clean = clean_rows(cfg)
        per_seed, files = {}, []
        for seed in cfg.seeds:
            folder = out / f"seed-{seed}"
            rows, bad = corrupt(clean, cfg.fraction, seed, tuple(cfg.corruptions))
            if not bad:
                from .errors import CurateError

                raise CurateError(f"{cfg.input}: no row can be corrupted with {', '.join(cfg.corruptions)}")
            reporter.log(f"seed {seed}: corrupted {len(bad):,} of {len(rows):,} rows: {dict(Counter(bad.values()))}")
            folder.mkdir(parents=True, exist_ok=True)
            write_rows(folder / "corrupted.jsonl", rows)
            io.write_json_atomic(folder / "corrupted.json", bad)
            score_cfg = wiring.written_rows_config(options, folder / "corrupted.jsonl", folder / "scores")
            scored = score.run(score_cfg, reporter, force)
            prune_cfg = PruneConfig(**cfg.prune.model_dump(), scores=str(folder / "scores"), out="")
            coords = prune.collect_coordinates(
                prune.score_files(folder / "scores", scored),
                prune_cfg,
                scored.get("vocab_size"),
                scored.get("score_positions", "all"),
                scored.get("signals", []),
            )
            coords = prune.mark_duplicates(coords, prune_cfg.keep_duplicates)
            per_seed[seed] = probe_table(coords, bad, cfg, seed, scored.get("signals", []))
            files += [f"seed-{seed}/corrupted.jsonl", f"seed-{seed}/corrupted.json"]
        result = combine(per_seed)
        io.write_json_atomic(out / "probe.json", result)
        io.write_bytes_atomic(out / "probe.md", probe_markdown(cfg, result).encode())
        return io.write_manifest(
            out,
            "probe",
            io.fingerprint_config({"config": cfg.model_dump(), "version": __version__}),
            started,
            files=[io.file_entry(out, n) for n in (*files, "probe.json", "probe.md")],
            config=cfg.model_dump(),
            result=result,
        )
