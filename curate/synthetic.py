"""Synthetic score files with the real schema, for tests and benchmarks of the prune stage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import io, schema

VOCAB = 49152  # as SmolLM2's; entropies are clipped to log(VOCAB), the largest possible


def synthetic_scores(out: Path, n_samples: int, mean_tokens: int = 200, shard_size: int = 2048, seed: int = 0) -> int:
    """Write `n_samples` scored conversations (prompt then one assistant turn ending in an end-of-turn token)
    as score shards plus a manifest. Returns the number of tokens written."""
    rng = np.random.default_rng(seed)
    total = 0
    shards = []
    for s, start in enumerate(range(0, n_samples, shard_size)):
        rows = min(shard_size, n_samples - start)
        lengths = rng.integers(max(4, mean_tokens // 2), mean_tokens * 3 // 2 + 1, size=rows)
        cols = {name: [] for name in schema.SCORES.names}
        for i, n in enumerate(lengths):
            n = int(n)
            prompt = int(rng.integers(1, n - 2))
            trainable = np.zeros(n, dtype=np.int8)
            trainable[prompt:] = 1
            # per-sample difficulty and spread, so samples spread over the EU plane
            logprob = (-rng.gamma(1.5, rng.uniform(0.2, 2.0), size=n)).astype(np.float32)
            entropy = np.minimum(rng.gamma(2.0, rng.uniform(0.2, 1.5), size=n), np.log(VOCAB)).astype(np.float32)
            logprob[0] = entropy[0] = np.nan
            sid = f"s{start + i:08d}"
            for name, value in (
                ("id", sid),
                ("messages", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
                ("input_ids", rng.integers(3, VOCAB, size=n).astype(np.int32)),
                ("trainable", trainable),
                ("logprob", logprob),
                ("entropy", entropy),
                ("n_tokens", n),
                ("n_trainable", int(trainable.sum())),
                ("truncated", False),
                ("content_hash", sid),
            ):
                cols[name].append(value)
            total += n
        name = schema.scores_shard(s)
        io.write_parquet_atomic(pa.Table.from_pydict(cols, schema=schema.SCORES), out / name, {"backend": "synthetic"})
        shards.append(io.file_entry(out, name, rows=rows))
    io.write_manifest(
        out,
        "score",
        f"synthetic-{n_samples}-{seed}",
        time.time(),
        files=shards,
        counts={"samples": n_samples, "tokens": total},
        vocab_size=VOCAB,
        model={"name": "synthetic", "path": "synthetic", "hash": "synthetic"},
    )
    return total
