"""`curate score`: tokenise every conversation and score every token with the reference model.

Output: `OUT/part-NNNNN.parquet` (schema.SCORES), `OUT/_manifest.json` last. Shards are fixed slices of the
usable rows in input order, so an interrupted run recomputes exactly the shards that are missing.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from .. import __version__, io, schema
from ..errors import CurateError, RowError
from ..formats import Sample, Skip, count_rows, parse_fields, read_samples

MAX_SKIP_EXAMPLES = 20


@dataclass
class ScoreConfig:
    input: str
    out: str
    model: str | None = None
    backend: str = "auto"
    format: str = "auto"
    fields: str | None = None
    limit: int | None = None
    max_length: int = 2048
    batch_tokens: int = 4096
    shard_size: int = 512
    dtype: str = "auto"
    device: str = "auto"
    on_bad_row: str = "skip"  # or "fail"
    # vLLM engine options (ignored by the transformers backend)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None  # None: eager on CPUs, compiled (CUDA graphs) on GPUs
    vllm_entropy: str = "exact"  # or "topk": the approximate fallback, flagged in the files


@dataclass
class Progress:
    """Callbacks the CLI uses to draw a progress bar; the stage itself prints nothing."""

    start: Callable[[int | None], None] = lambda total: None
    advance: Callable[[int, int], None] = lambda rows, tokens: None
    log: Callable[[str], None] = lambda msg: None


@dataclass
class _Tokenised:
    sample: Sample
    input_ids: np.ndarray
    trainable: np.ndarray
    truncated: bool


@dataclass
class _Counts:
    rows_read: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    truncated: int = 0


def _tokenised_samples(cfg: ScoreConfig, tokenizer, counts: _Counts) -> Iterator[_Tokenised]:
    from ..tokenization import encode

    path = Path(cfg.input)
    for item in read_samples(path, cfg.format, parse_fields(cfg.fields)):
        if cfg.limit is not None and counts.samples >= cfg.limit:
            return
        counts.rows_read += 1
        if isinstance(item, Sample):
            try:
                enc = encode(tokenizer, item.messages, cfg.max_length)
            except RowError as e:
                item = Skip(item.row, e.reason, e.field, str(e))
            else:
                counts.samples += 1
                counts.truncated += int(enc.truncated)
                yield _Tokenised(item, enc.input_ids, enc.trainable, enc.truncated)
                continue
        if cfg.on_bad_row == "fail":
            where = f", field {item.field!r}" if item.field else ""
            raise CurateError(f"{path}, row {item.row}{where}: {item.message} [{item.reason}] "
                              "(use --on-bad-row skip to count and skip such rows)")
        counts.skipped[item.reason] += 1
        if len(counts.examples) < MAX_SKIP_EXAMPLES:
            counts.examples.append({"file": str(path), "row": item.row, "field": item.field,
                                    "reason": item.reason, "message": item.message})


def _shards(items: Iterator[_Tokenised], size: int) -> Iterator[list[_Tokenised]]:
    shard: list[_Tokenised] = []
    for item in items:
        shard.append(item)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _table(shard: list[_Tokenised], scores: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    cols = {
        "id": [t.sample.id for t in shard],
        "messages": [t.sample.messages for t in shard],
        "input_ids": [t.input_ids for t in shard],
        "trainable": [t.trainable for t in shard],
        "logprob": [lp for lp, _ in scores],
        "entropy": [ent for _, ent in scores],
        "n_tokens": [len(t.input_ids) for t in shard],
        "n_trainable": [int(t.trainable.sum()) for t in shard],
        "truncated": [t.truncated for t in shard],
    }
    return pa.Table.from_pydict(cols, schema=schema.SCORES)


def _validate(cfg: ScoreConfig) -> None:
    problems = []
    if cfg.on_bad_row not in ("skip", "fail"):
        problems.append(f"--on-bad-row must be skip or fail, not {cfg.on_bad_row!r}")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append("--limit must be at least 1")
    if cfg.max_length < 2:
        problems.append("--max-length must be at least 2")
    if cfg.batch_tokens < 2:
        problems.append("--batch-tokens must be at least 2")
    if cfg.shard_size < 1:
        problems.append("--shard-size must be at least 1")
    if cfg.vllm_entropy not in ("exact", "topk"):
        problems.append(f"--vllm-entropy must be exact or topk, not {cfg.vllm_entropy!r}")
    if cfg.gpu_memory_utilization is not None and not 0 < cfg.gpu_memory_utilization <= 1:
        problems.append("--gpu-memory-utilization must be in (0, 1]")
    if cfg.tensor_parallel_size < 1:
        problems.append("--tensor-parallel-size must be at least 1")
    if problems:
        raise CurateError("; ".join(problems))


def _engine_options(cfg: ScoreConfig):
    from ..backends.vllm import EngineOptions

    return EngineOptions(tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                         max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len,
                         enforce_eager=cfg.enforce_eager, entropy=cfg.vllm_entropy)


def _refuse_mixed_methods(out: Path, method: str) -> None:
    """A resumed run must compute entropies the way its finished shards did (exact vs top-k approximation)."""
    for path in sorted(out.glob(schema.SCORES_GLOB)):
        earlier = io.parquet_metadata(path).get("entropy_method")
        if earlier != method:
            raise CurateError(f"{path} holds entropies computed as {earlier!r} but this run computes {method!r}; "
                              "a run never mixes methods: fix the cause or rerun with --force")


def run(cfg: ScoreConfig, progress: Progress | None = None, force: bool = False) -> dict:
    """Score `cfg.input` into `cfg.out`; returns the manifest. A finished identical run is a no-op."""
    from ..backends import choose_backend, make_scorer
    from ..models import load_tokenizer, resolve_model
    from ..tokenization import chat_template_hash, ensure_chat_template

    _validate(cfg)
    progress = progress or Progress()
    started = time.time()
    in_path, out = Path(cfg.input), Path(cfg.out)
    if not in_path.exists():
        raise CurateError(f"{in_path}: no such file or folder")
    model = resolve_model(cfg.model)
    backend, why = choose_backend(cfg.backend, cfg.device)
    resolved = {**asdict(cfg), "input": str(in_path), "out": str(out), "model": model.name, "backend": backend}
    identity = {k: v for k, v in resolved.items() if k != "out"}
    input_fingerprint = io.fingerprint_path(in_path)  # hashes the whole input: once per run
    fingerprint = io.fingerprint_config({"config": identity, "input": input_fingerprint,
                                         "model": model.hash, "version": __version__})
    if force:
        for old in list(out.glob(schema.SCORES_GLOB)) + [out / io.MANIFEST]:
            old.unlink(missing_ok=True)
    done = io.is_done(out, fingerprint)
    if done:
        progress.log(f"{out}: already scored with these inputs and settings; nothing to do (--force redoes it)")
        return done
    if (out / io.MANIFEST).exists() or any(
            io.parquet_metadata(p).get("run_fingerprint") != fingerprint for p in out.glob(schema.SCORES_GLOB)):
        raise CurateError(f"{out} holds scores from other inputs or settings; use --force to replace them "
                          "or choose another --out")

    tokenizer = load_tokenizer(model)
    if ensure_chat_template(tokenizer):
        progress.log("warning: the tokenizer has no chat template; using the ChatML fallback")
    progress.log(f"backend: {backend} ({why}); model: {model.name}")
    total = count_rows(in_path)
    progress.start(min(total, cfg.limit) if total is not None and cfg.limit else total)

    scorer = None
    counts = _Counts()
    shard_files, tokens, trainable_tokens, scored_tokens, score_time = [], 0, 0, 0, 0.0
    try:
        for index, shard in enumerate(_shards(_tokenised_samples(cfg, tokenizer, counts), cfg.shard_size)):
            path = out / io.shard_name("part", index)
            shard_tokens = sum(len(t.input_ids) for t in shard)
            tokens += shard_tokens
            trainable_tokens += sum(int(t.trainable.sum()) for t in shard)
            shard_files.append(path.name)
            if not path.exists():  # shards are written atomically: one that exists is complete
                if scorer is None:
                    scorer = make_scorer(backend, model.path, dtype=cfg.dtype, device=cfg.device,
                                         batch_tokens=cfg.batch_tokens, max_length=cfg.max_length,
                                         engine=_engine_options(cfg), log=progress.log)
                    _refuse_mixed_methods(out, scorer.entropy_method)
                t0 = time.time()
                progressed = [counts.rows_read - len(shard), tokens - shard_tokens]  # rows, tokens before this shard

                def on_batch(rows, toks):
                    progressed[0] += rows
                    progressed[1] += toks
                    progress.advance(*progressed)

                scores = scorer.score([t.input_ids for t in shard], on_batch=on_batch)
                score_time += time.time() - t0
                scored_tokens += shard_tokens
                metadata = {
                    "run_fingerprint": fingerprint, "model": model.name, "model_hash": model.hash,
                    "tokenizer": model.name, "chat_template_hash": chat_template_hash(tokenizer),
                    "backend": backend, "dtype": scorer.dtype, "entropy_method": scorer.entropy_method,
                    "max_length": cfg.max_length, "curate_version": __version__,
                }
                if scorer.entropy_max_error is not None:  # approximate entropies carry their error bound
                    metadata["entropy_max_error"] = scorer.entropy_max_error
                io.write_parquet_atomic(_table(shard, scores), path, metadata)
            progress.advance(counts.rows_read, tokens)
    finally:
        if scorer is not None:
            scorer.close()
    if counts.samples == 0:
        raise CurateError(f"{in_path}: no usable rows (skipped: {dict(counts.skipped) or 'none read'})")
    # From the shards, so a resumed run reports the shards of earlier runs too (one method: mixing is refused).
    shard_meta = [io.parquet_metadata(out / f) for f in shard_files]
    entropy = {"method": shard_meta[0]["entropy_method"]}
    errors = [float(m["entropy_max_error"]) for m in shard_meta if "entropy_max_error" in m]
    if errors:
        entropy["topk_max_error_nats"] = round(max(errors), 6)  # half-width of the widest tail-mass bound

    return io.write_manifest(
        out, "score", fingerprint, started,
        inputs=[{"path": str(in_path), "fingerprint": input_fingerprint}],
        config=resolved, backend_choice=why, entropy=entropy,
        model={"name": model.name, "path": model.path, "hash": model.hash},
        counts={"rows_read": counts.rows_read, "samples": counts.samples,
                "skipped": sum(counts.skipped.values()), "truncated": counts.truncated,
                "tokens": tokens, "trainable_tokens": trainable_tokens},
        skipped_by_reason=dict(counts.skipped), skipped_examples=counts.examples,
        shards=shard_files,
        scoring={"tokens_scored_this_run": scored_tokens, "seconds": round(score_time, 3),
                 "tokens_per_s": round(scored_tokens / score_time, 1) if score_time else None},
    )
