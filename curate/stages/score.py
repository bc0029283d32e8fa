"""`curate score`: tokenise every conversation and score every token with the reference model.

Output: `OUT/part-NNNNN.parquet` (schema.SCORES), `OUT/_manifest.json` last. Shard i holds the usable rows among
input rows [i * shard_size, (i + 1) * shard_size), whichever engine wrote it, so an interrupted run recomputes
exactly the shards that are missing, and a run started on one engine can be finished on the other. A
`ShardWorker` (`curate.scoring`) does everything for one shard (read, convert, tokenise, score, check, write); the
in-process engine runs one (`curate.engines.local`), the Ray engine one per actor (`curate.engines.ray`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from .. import io, readers, schema
from ..config.score import ScoreConfig
from ..errors import CurateError
from ..executor import Job, finished_by, runner
from ..formats import DETECT_ROWS, detect_format, parse_fields
from ..kinds import Scores
from ..registry import register
from ..scoring import MAX_SKIP_EXAMPLES, ScoreJob, score_worker, shard_summary
from ..stage import Cli, Input, Resources, Shards, Stage


def identify(job: Job) -> dict:
    """Resolve the model, backend, format and dtype, and plan the shards: what identifies a run beyond its config
    and input. No model is loaded."""
    from ..backends import choose_backend
    from ..models import resolve_model

    cfg = job.cfg
    source = readers.resolve(job.inputs["input"], cfg.split, cfg.subset)
    for path in source.files:
        readers.kind(path)  # a supported type
    backend, why = choose_backend(cfg.backend, cfg.device)
    model = resolve_model(cfg.model, log=job.log)
    fmt = (
        cfg.format
        if cfg.format != "auto"
        else detect_format(source, readers.head(source, DETECT_ROWS), parse_fields(cfg.fields))
    )
    files = [PurePosixPath(f).name for f in source.files] if len(source.files) > 1 else []

    def identity(dtype: str) -> dict:
        return {
            "dtype": dtype,
            "model": model.name,
            "model_hash": model.hash,
            "backend": backend,
            "format": fmt,
            **({"files": files} if files else {}),  # which files of a folder or pattern were read
        }

    dtype, dtype_why = run_dtype(cfg, lambda d: job.fingerprint_with(identity(d)))
    job.context.update(
        model=model,
        backend=backend,
        format=fmt,
        info={
            "dtype": {"dtype": dtype, "why": dtype_why},
            "backend_choice": why,
            "model": model.entry(),
        },
        source=source,
        ranges=readers.plan(source, cfg.shard_size, cfg.limit),
    )
    return identity(dtype)


def run_dtype(cfg: ScoreConfig, fingerprint_with) -> tuple[str, str]:
    """The dtype of this run, resolved once: `--dtype auto` follows the device and the CPU's bf16 support, except
    that a run already started in OUT with `auto` keeps the dtype it started with, whatever this machine would pick."""
    from ..backends import choose_dtype, cpu_bf16_feature

    if cfg.dtype != "auto":
        return cfg.dtype, "requested"
    from ..backends import resolve_device

    device = resolve_device(cfg.device)
    dtype, why = choose_dtype("auto", device, None if device.startswith("cuda") else cpu_bf16_feature())
    for path in sorted(Path(cfg.out).glob(schema.SCORES_GLOB))[:1]:
        try:
            meta = io.parquet_metadata(path)
        except CurateError:
            continue
        earlier = meta.get("dtype")
        if earlier and earlier != dtype and finished_by(path, fingerprint_with(earlier)):
            return earlier, f"auto: {earlier}, as this run started (this machine would pick {dtype}: {why})"
    return dtype, why


# ---------------------------------------------------------------- the shards, as the executor runs them


def plan(job: Job) -> list:
    """The shards of the input (planned by `identify`); score shards past them (an earlier, longer --limit of this
    run) are removed."""
    ranges, info = job.context["ranges"], job.context["info"]
    for stray in sorted(job.out.glob(schema.SCORES_GLOB)):
        if int(stray.stem.split("-")[1]) >= len(ranges):
            stray.unlink()
    job.log(
        f"backend: {job.context['backend']} ({info['backend_choice']}); dtype: {info['dtype']['dtype']} "
        f"({info['dtype']['why']}); model: {job.context['model'].name}; format: {job.context['format']}; engine: "
        f"{job.cfg.engine}"
    )
    return ranges


def work(job: Job) -> ScoreJob:
    """What every worker needs, local or on Ray: every worker scores in the run's dtype."""
    info, model = job.context["info"], job.context["model"]
    cfg = job.cfg.model_copy(update={"dtype": info["dtype"]["dtype"]})
    job.context["work"] = ScoreJob(
        cfg,
        model.path,
        model.name,
        model.hash,
        job.context["backend"],
        job.context["format"],
        job.context["source"],
        tuple(job.finished),
    )
    return job.context["work"]


def reduce(job: Job, ranges: list, results: dict, info: dict) -> dict:
    """The run's scoring figures from the shards scored now, then `finalize`."""
    tokens = sum(r["tokens"] for r in results.values())
    seconds = sum(r["seconds"] for r in results.values())
    engine_info = {
        **info,
        "tokens_scored_this_run": tokens,
        "seconds": info.get("seconds") if info.get("engine") == "ray" else round(seconds, 3),
        "shard_summaries": {i: r["summary"] for i, r in results.items() if "summary" in r},
    }
    wall = engine_info["seconds"] or 0
    engine_info["tokens_per_s"] = round(tokens / wall, 1) if tokens and wall else None
    engine_info.setdefault("worker_tokens_per_s", [engine_info["tokens_per_s"]] if engine_info["tokens_per_s"] else [])
    return finalize(job, job.context["work"], ranges, job.context["info"], engine_info)


SHARDS = Shards(
    plan=plan,
    output=lambda rows: schema.scores_shard(rows.index),
    work=work,
    worker=score_worker,
    reduce=reduce,
    size=lambda rows: rows.stop - rows.start,
    unit="rows",
    resources=lambda cfg: Resources(
        engine=cfg.engine,
        workers=cfg.workers if cfg.engine == "ray" else 1,  # locally one scorer, which tokenises ahead
        gpus_per_worker=cfg.gpus_per_worker,
        cpus_per_worker=cfg.cpus_per_worker,
        address=cfg.address,
    ),
)


# ---------------------------------------------------------------- finishing: duplicates and the manifest


def drop_rows(path: Path, drop: dict[int, str], examples: list) -> None:
    """Rewrite one shard without the rows at these positions (reason per row), counting them as skipped."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = io.parquet_metadata(path)
    counts = json.loads(meta["counts"])
    ids = table.column("id").to_pylist()
    for pos, reason in drop.items():
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append({"file": path.name, "sample": ids[pos], "reason": reason})
    keep = np.ones(table.num_rows, dtype=bool)
    keep[list(drop)] = False
    meta["counts"] = json.dumps(counts)
    io.write_parquet_atomic(table.filter(pa.array(keep)), path, meta)


def duplicate_drops(summaries: list[tuple[int, dict]], dedup: bool) -> tuple[dict, Counter]:
    """Which rows to drop, per shard: later rows with an id already used (duplicate_id), and with --dedup later
    copies of an identical conversation (duplicate_content, always counted: the groups)."""
    seen_ids, seen_content, groups = set(), {}, Counter()
    drops: dict[int, dict[int, str]] = {}
    for index, summary in summaries:
        for pos, (sid, digest) in enumerate(zip(summary["ids"], summary["content_hash"])):
            if sid in seen_ids:
                drops.setdefault(index, {})[pos] = "duplicate_id"
                continue
            seen_ids.add(sid)
            if digest in seen_content:
                groups[seen_content[digest]] += 1
                if dedup:
                    drops.setdefault(index, {})[pos] = "duplicate_content"
            else:
                seen_content[digest] = sid
    return drops, groups


def finalize(job: Job, work: ScoreJob, ranges, info: dict, engine_info: dict) -> dict:
    """Drop duplicates (idempotent, so a rerun after a crash is safe) and sum up the shards for the manifest, from
    what each shard's worker read of it where it was written (a shard on this disk is read here)."""
    out, cfg = job.out, work.cfg
    reported = engine_info.pop("shard_summaries", {})
    names = {r.index: schema.scores_shard(r.index) for r in ranges}

    def summary_of(index: int) -> dict:
        return shard_summary(out, names[index]) if (out / names[index]).exists() else reported[index]

    summaries = {r.index: summary_of(r.index) for r in ranges}
    drops, groups = duplicate_drops(sorted(summaries.items()), cfg.dedup)
    dropped: list = []
    for index, drop in sorted(drops.items()):
        if job.remote and not (out / names[index]).exists():
            job.remote.fetch(names[index])  # written on another node: rewritten here, then uploaded
        drop_rows(out / names[index], drop, dropped)
        summaries[index] = shard_summary(out, names[index])
    metas = [summaries[r.index]["meta"] for r in ranges]
    skipped, examples, rows_read = Counter(), [], 0
    for m in metas:
        c = json.loads(m["counts"])
        rows_read += c["rows_read"]
        skipped.update(c["skipped"])
        examples += c["examples"][: MAX_SKIP_EXAMPLES - len(examples)]
    samples = sum(s["entry"]["rows"] for s in summaries.values())
    if samples == 0:
        raise CurateError(no_usable_rows(cfg, work, dict(skipped), examples))
    entropy = {"method": metas[0]["entropy_method"]}
    errors = [float(m["entropy_max_error"]) for m in metas if "entropy_max_error" in m]
    if errors:
        entropy["topk_max_error_nats"] = round(max(errors), 6)  # half-width of the widest tail-mass bound
    job.entries.update({names[i]: s["entry"] for i, s in summaries.items()})
    return {
        "config": {**cfg.model_dump(), "model": work.model_name, "backend": work.backend, "format": work.format},
        "source": work.source.entry(),
        "backend_choice": info["backend_choice"],
        "dtype": info["dtype"],
        "entropy": entropy,
        "model": info["model"],
        "vocab_size": int(metas[0]["vocab_size"]),
        "keep_fields": cfg.keep_fields,
        "signals": cfg.signals,
        "score_positions": cfg.positions,
        "tool_rendering": metas[0].get("tool_rendering"),  # how rows' tool schemas reached the model
        "chat_template_hash": metas[0].get("chat_template_hash"),
        "counts": {
            "rows_read": rows_read,
            "samples": samples,
            "skipped": sum(skipped.values()),
            "truncated": sum(s["truncated"] for s in summaries.values()),
            "tokens": sum(s["tokens"] for s in summaries.values()),
            "trainable_tokens": sum(s["trainable"] for s in summaries.values()),
        },
        "skipped_by_reason": dict(skipped),
        "skipped_examples": examples + dropped,
        "duplicates": {
            "groups": len(groups),
            "later_copies": sum(groups.values()),
            "dropped": cfg.dedup,
            "first_ids": sorted(groups)[:MAX_SKIP_EXAMPLES],
        },
        "scoring": engine_info,
    }


def no_usable_rows(cfg: ScoreConfig, work: ScoreJob, skipped: dict, examples: list) -> str:
    """Why nothing could be scored, in terms a user can act on: the field the rows lack, the fields they have,
    and the --fields that would read them."""
    message = f"{cfg.input}: no usable rows (skipped: {skipped or 'none read'})"
    missing = [e for e in examples if e.get("reason") == "missing_field" and e.get("field")]
    if not missing:
        return message
    first = next(iter(readers.read_range(work.input(), readers.plan(work.input(), 1, limit=1)[0])), (None, None))[1]
    have = list(first) if isinstance(first, dict) else []
    lacking = sorted({e["field"] for e in missing})
    message += f": the rows have no field {', '.join(map(repr, lacking))}"
    if have:
        message += f"; the first row's fields are {', '.join(have)}"
        texts = [k for k in have if isinstance(first.get(k), str)]
        prompt = next((k for k in texts if k.lower() in PROMPT_NAMES), "FIELD")
        response = next((k for k in texts if k.lower() in RESPONSE_NAMES), "FIELD")
        message += f". Name the fields with --fields, e.g. --fields prompt={prompt},response={response}"
    return message


PROMPT_NAMES = ("question", "instruction", "prompt", "input", "query", "problem", "text")
RESPONSE_NAMES = ("answer", "output", "response", "completion", "solution", "target")


class ScoreResult(Scores):
    counts: dict[str, int]
    entropy: dict
    skipped_by_reason: dict[str, int]
    skipped_examples: list[dict]
    scoring: dict


def summary(m: ScoreResult) -> list:
    from rich.table import Table

    c = m.counts
    t = Table(title=f"scores: {m.config['out']}", show_header=False)
    t.add_row("model", f"{m.model['name']} ({m.model['path']})")
    t.add_row("backend", f"{m.config['backend']} ({m.get('backend_choice', '')})")
    t.add_row("dtype", f"{m.dtype['dtype']} ({m.dtype['why']})")
    bound = f" (max error {m.entropy['topk_max_error_nats']:.3g} nats)" if "topk_max_error_nats" in m.entropy else ""
    t.add_row("entropy", m.entropy["method"] + bound)
    t.add_row("rows read", f"{c['rows_read']:,}")
    t.add_row("samples scored", f"{c['samples']:,}")
    t.add_row("skipped", f"{c['skipped']:,} " + (str(m.skipped_by_reason) if c["skipped"] else ""))
    dup = m.duplicates
    if dup["groups"]:
        t.add_row(
            "duplicates",
            f"{dup['later_copies']:,} later copies of {dup['groups']:,} conversations "
            + ("(dropped)" if dup["dropped"] else "(kept; --dedup drops them)"),
        )
    t.add_row("truncated", f"{c['truncated']:,}")
    t.add_row("tokens / trainable", f"{c['tokens']:,} / {c['trainable_tokens']:,}")
    s = m.scoring
    t.add_row(
        "scoring speed",
        f"{s['tokens_per_s']:,.0f} tokens/s ({s['engine']}, {s['workers']} worker(s))"
        if s["tokens_per_s"]
        else "(nothing scored in this run)",
    )
    t.add_row("shards", f"{len(m.files)} x part-NNNNN.parquet")
    t.add_row("wall time", f"{m.wall_time_s:.1f} s")
    return [t]


def needs(cfg: ScoreConfig) -> tuple[str, ...]:
    return (
        "torch",
        "transformers",
        *(("vllm",) if cfg.backend == "vllm" else ()),
        *(("ray",) if cfg.engine == "ray" else ()),
    )


STAGE = register(
    Stage(
        name="score",
        produces="scores",
        config=ScoreConfig,
        doc="Score every token of INPUT with a reference model: log-prob and entropy per token, as Parquet.",
        shards=SHARDS,  # planned, resumed per shard and run on the local or Ray engine by the executor
        identify=identify,
        inputs=(Input("input", data=True, hint="the SFT data to score"), Input("model", model=True)),
        outputs=(schema.SCORES_GLOB,),
        needs=needs,
        result=ScoreResult,
        summary=summary,
        resumable=True,
        expensive=True,
        cli=Cli(arguments=("input",)),
    )
)
run = runner(STAGE)
