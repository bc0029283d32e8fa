"""Synthetic score files with the real schema, for tests and benchmarks of the prune stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from . import io, schema


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
            entropy = rng.gamma(2.0, rng.uniform(0.2, 1.5), size=n).astype(np.float32)
            logprob[0] = entropy[0] = np.nan
            sid = f"s{start + i:08d}"
            for name, value in (("id", sid), ("messages", [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]),
                                ("input_ids", rng.integers(3, 1000, size=n).astype(np.int32)),
                                ("trainable", trainable), ("logprob", logprob), ("entropy", entropy),
                                ("n_tokens", n), ("n_trainable", int(trainable.sum())), ("truncated", False)):
                cols[name].append(value)
            total += n
        path = out / io.shard_name("part", s)
        io.write_parquet_atomic(pa.Table.from_pydict(cols, schema=schema.SCORES), path, {"backend": "synthetic"})
        shards.append(path.name)
    io.write_json_atomic(out / io.MANIFEST, {"stage": "score", "fingerprint": f"synthetic-{n_samples}-{seed}",
                                             "shards": shards, "counts": {"samples": n_samples, "tokens": total}})
    return total
