"""The GPU check: q-curate's transformers scorer on CUDA, measured against a plain fp32 reference, its peers and the
chip's peak; and, where vLLM is installed (a user's own GPU box), the vLLM paths. One PASS/FAIL (or SKIP) line each.

    bash scripts/gpu_wheels.sh            # once, where pip reaches the registry: the wheels the GPU machine lacks
    bash scripts/gpu_check.sh             # on the GPU machine, offline: installs them, runs this
    bash scripts/gpu_check.sh --dry-run   # the same checks on CPU at toy shapes (a test runs it in a clean venv)

The GPU machine this project is lent has torch, transformers, pyarrow, typer, rich, fsspec and pyyaml but no vLLM,
polars, pydantic or datasets, no network, and takes at most 64 MiB along: so the models are built there with random
weights of real shapes (throughput and memory do not depend on the weights' values), the rows are the demo data the
package ships, tokenised with the built-in model's tokenizer (its files, carried by gpu_wheels.sh), and scoring
imports no polars. Each check runs in its own process (a fresh CUDA context, its own timeout). Results go to
stdout and, on a GPU, to benchmarks/gpu_check.md (BENCHMARKS.md includes it); a dry run writes them under WORK.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "gpu_check.md"
GPU_DIR = Path(os.environ.get("CURATE_GPU_DIR", ROOT / ".gpu"))  # what gpu_wheels.sh put there: wheels/, tokenizer/
WORK = Path(os.environ.get("CURATE_GPU_CHECK_DIR", "/tmp/q-curate-gpu-check"))
DRY = "--dry-run" in sys.argv
BF16_PEAK = 790e12  # FLOP/s, the H200's dense bf16 matmul rate as measured on the lent machine (device KINDS.md)
REDUCTION_SHARE = 0.15  # above it, a fused LM-head + reduction (verl's linear_cross_entropy) is worth trying

# Real shapes (the models' configs); the dry run shrinks everything but the vocabulary.
SHAPES = {
    "SmolLM2-135M": dict(arch="llama", vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv=3),
    "SmolLM2-1.7B": dict(arch="llama", vocab=49152, hidden=2048, inter=8192, layers=24, heads=32, kv=32),
    "Qwen2.5-1.5B": dict(arch="qwen2", vocab=151936, hidden=1536, inter=8960, layers=28, heads=12, kv=2),
}
TOY = dict(hidden=64, inter=128, layers=2, heads=2, kv=1)


def device() -> str:
    return "cpu" if DRY else "cuda"


def shape(name: str) -> dict:
    return {**SHAPES[name], **(TOY if DRY else {})}


# ---------------------------------------------------------------- inputs, built where the check runs


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPU_DIR / "tokenizer")


def rows(n: int, turns: int = 2) -> list[list[dict]]:
    """n conversations of `turns` exchanges each, from the package's demo data (distinct: rows are combined by
    index, so the same pair never repeats within n)."""
    demo = [json.loads(line)["messages"] for line in (ROOT / "curate" / "data" / "demo.jsonl").open()]
    return [[m for t in range(turns) for m in demo[(i * 7 + t * 131) % len(demo)]] for i in range(n)]


def token_ids(n: int, long: int | None = None):
    """The chat-templated token ids of n rows (or of n rows cut at `long` tokens, joined from many exchanges)."""
    sys.path.insert(0, str(ROOT))
    from curate.tokenization import encode

    tok = tokenizer()
    if long is None:
        return [encode(tok, r).input_ids for r in rows(n)]
    out = []
    for r in rows(n, turns=4 * long // 60 + 1):  # a demo exchange is about 60 tokens
        out.append(encode(tok, r).input_ids[:long])
    return out


def build_model(name: str, scale_head: float = 1.0) -> str:
    """A model of `name`'s shape with random weights, saved with the carried tokenizer (for `curate score`)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    s = shape(name)
    path = WORK / f"{name}{'-toy' if DRY else ''}{'-peaked' if scale_head != 1 else ''}"
    if (path / "config.json").exists():
        return str(path)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[s["arch"]]
    cfg = config_class(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.float32 if DRY or scale_head != 1 else torch.bfloat16
    with torch.device(device()):  # initialised where it runs: a 1.7B model in seconds, not minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if scale_head != 1:  # peaked distributions: entropies far from log V, as a trained model's are
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale_head)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def flops_per_token(name: str, context: float) -> float:
    """Forward FLOPs per token: 2 x the matmul weights (attention projections, MLP, LM head) and the attention
    scores and values over `context` earlier positions on average."""
    s = shape(name)
    head_dim = s["hidden"] // s["heads"]
    attention = s["hidden"] * (s["hidden"] + 2 * s["kv"] * head_dim) + s["hidden"] * s["hidden"]
    weights = s["layers"] * (attention + 3 * s["hidden"] * s["inter"]) + s["vocab"] * s["hidden"]
    return 2 * weights + 4 * s["layers"] * s["hidden"] * context


def peak_flops() -> tuple[float, str]:
    """The reference peak: the chip's bf16 rate on a GPU; in a dry run, an fp32 matmul measured here."""
    if not DRY:
        return BF16_PEAK, "the H200's bf16 peak, 790 TFLOP/s"
    import torch

    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 1024**3 / (time.perf_counter() - t0)
    return rate, f"this CPU's fp32 matmul, {rate / 1e9:,.0f} GFLOP/s"


def synchronize() -> None:
    if not DRY:
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- the checks

CHECKS: dict = {}


def check(name: str, env: dict | None = None, gpus: int = 1, timeout: int = 600, vllm: bool = False):
    """Declare a check: its own process, with `env` added to the environment, skipped without `gpus` GPUs."""

    def register(fn):
        CHECKS[name] = (fn, env or {}, gpus, timeout, vllm)
        return fn

    return register


def reference(model, ids):
    """One plain fp32 forward, full logits, `torch.log_softmax` in float64: the independent reference."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([list(ids)], device=device())
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        lp = logp[:-1].gather(-1, x[0, 1:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)[:-1]
    return lp.cpu().numpy(), ent.cpu().numpy()


def exactness(dtype: str, limit_max: float, limit_mean: float) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from curate.backends.hf import HFScorer

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is IEEE fp32
    torch.backends.cudnn.allow_tf32 = False
    path = build_model("SmolLM2-135M", scale_head=20.0)
    seqs = token_ids(8 if DRY else 64)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device()).eval()
    refs = [reference(ref_model, s) for s in seqs]
    del ref_model
    scorer = HFScorer(path, dtype=dtype, device=device())
    got = scorer.score(seqs)
    lp = [np.abs(g[0][1:].astype(float) - r[0]) for g, r in zip(got, refs)]
    ent = [np.abs(g[1][1:].astype(float) - r[1]) for g, r in zip(got, refs)]
    worst = max(max(float(x.max()) for x in lp), max(float(x.max()) for x in ent))
    mean = max(float(np.mean(np.concatenate(lp))), float(np.mean(np.concatenate(ent))))
    ok = worst <= limit_max and mean <= limit_mean
    return {
        "ok": ok,
        "detail": f"{len(seqs)} rows: max |diff| log-prob {max(float(x.max()) for x in lp):.2e}, entropy "
        f"{max(float(x.max()) for x in ent):.2e}; mean {mean:.2e} (limits {limit_max:g} max, {limit_mean:g} mean)",
    }


@check("exact: fp32 log-prob and entropy against an fp32 log_softmax reference")
def _exact_fp32():
    return exactness("float32", 2e-3 if not DRY else 1e-4, 1e-4 if not DRY else 1e-5)


@check("exact: bf16 log-prob and entropy against the fp32 reference (the gap bf16 adds)")
def _exact_bf16():
    return exactness("bfloat16", 1.0, 0.1)


def run_curate_score(model: str, data: Path, out: Path, **options) -> dict:
    """`curate score` as the command runs it (the stage, the local engine, its tokenising processes)."""
    sys.path.insert(0, str(ROOT))
    from curate.config import ScoreConfig
    from curate.stages import score

    cfg = ScoreConfig(input=str(data), out=str(out), model=model, backend="hf", device=device(), **options)
    return score.run(cfg, force=True).model_dump()


def timed_peer(fn, *args) -> float:
    fn(*[a[:2] if isinstance(a, list) else a for a in args])  # warm-up
    synchronize()
    t0 = time.perf_counter()
    fn(*args)
    synchronize()
    return time.perf_counter() - t0


def throughput(name: str) -> list[dict]:
    """tokens/s of `curate score` against a raw batched forward, the per-row peer (Cherry/Superfiltering) and the
    in-trainer peer (the paper's code) on the same rows; the model-FLOPs utilisation; the reduction's share; and
    whether tokenisation keeps up with scoring."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from benchmarks.peers import in_trainer, per_sample
    from curate.backends.hf import token_budget_batches
    from curate.tokenization import ChatEncoder

    dtype = "float32" if DRY else "bfloat16"
    path = build_model(name)
    n = 24 if DRY else 4096
    conversations = rows(n)
    data = WORK / f"rows-{n}.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i:05d}", "messages": r}) + "\n" for i, r in enumerate(conversations)))
    batch_tokens = 2048 if DRY else 65536
    manifest = run_curate_score(path, data, WORK / f"scores-{name}", dtype=dtype, batch_tokens=batch_tokens)
    scoring = manifest["scoring"]
    tokens = manifest["counts"]["tokens"]
    spent = scoring["time_spent_s"]
    curate_rate = tokens / scoring["seconds"]  # scoring time: tokenising ahead, the forward, reduction and writing
    reduction = spent.get("reduction", 0.0) / max(spent.get("forward", 0.0) + spent.get("reduction", 0.0), 1e-9)

    encoder = ChatEncoder(tokenizer())
    t0 = time.perf_counter()
    seqs = [encoder.encode(r).input_ids for r in conversations]
    tokenise_rate = len(seqs) / (time.perf_counter() - t0)  # rows/s on one core
    workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    rows_rate = len(seqs) / scoring["seconds"]

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device()).eval()
    batches = token_budget_batches([len(s) for s in seqs], batch_tokens)

    def raw(seqs):
        with torch.inference_mode():
            for b in token_budget_batches([len(s) for s in seqs], batch_tokens) if len(seqs) < 3 else batches:
                longest = max(len(seqs[i]) for i in b)
                ids = torch.zeros((len(b), longest), dtype=torch.long)
                att = torch.zeros_like(ids)
                for r, i in enumerate(b):
                    ids[r, : len(seqs[i])] = torch.from_numpy(seqs[i].astype(np.int64))
                    att[r, : len(seqs[i])] = 1
                model(input_ids=ids.to(device()), attention_mask=att.to(device()))

    raw_rate = tokens / timed_peer(raw, seqs)
    few = seqs[: 8 if DRY else 256]  # batch size 1 is slow: a subset, its own token count
    per_row_rate = sum(len(s) for s in few) / timed_peer(per_sample.score, model, few)
    in_trainer_rate = tokens / timed_peer(in_trainer.score, model, seqs)
    context = float(np.mean([len(s) for s in seqs])) / 2
    peak, peak_name = peak_flops()
    mfu = curate_rate * flops_per_token(name, context) / peak
    s = shape(name)
    label = f"{name} shape{' (toy: vocabulary real, the rest shrunk)' if DRY else ''}, {s['vocab']:,} vocabulary"
    return [
        {
            "name": f"throughput, {label}",
            "ok": curate_rate > 0 and all(np.isfinite([raw_rate, per_row_rate, in_trainer_rate])),
            "detail": f"{len(seqs):,} rows, {tokens:,} tokens, {dtype}: curate score {curate_rate:,.0f} tokens/s; raw "
            f"batched forward {raw_rate:,.0f} ({curate_rate / raw_rate:.2f}x of it); per-row peer {per_row_rate:,.0f} "
            f"({curate_rate / per_row_rate:.1f}x); in-trainer peer {in_trainer_rate:,.0f} "
            f"({curate_rate / in_trainer_rate:.1f}x)",
        },
        {
            "name": f"model-FLOPs utilisation, {name} shape",
            "ok": 0 < mfu <= 1,
            "detail": f"{100 * mfu:.1f}% of {peak_name} ({flops_per_token(name, context) / 1e9:.2f} GFLOP a token)",
        },
        {
            "name": f"share of scoring time in the log-prob/entropy reduction, {name} shape",
            "ok": DRY or reduction <= REDUCTION_SHARE,  # toy shapes: a real vocabulary on a tiny model dominates
            "detail": f"{100 * reduction:.1f}% (forward {spent.get('forward', 0):.2f} s, reduction "
            f"{spent.get('reduction', 0):.2f} s); above {100 * REDUCTION_SHARE:.0f}% a fused LM head + reduction "
            "is worth trying" + ("; not judged in a dry run (toy shapes)" if DRY else ""),
        },
        {
            "name": f"tokenisation keeps up with scoring, {name} shape ({os.cpu_count()} cores)",
            "ok": tokenise_rate * max(workers, 1) >= rows_rate,
            "detail": f"one core tokenises {tokenise_rate:,.0f} rows/s; the local engine runs {workers} tokenising "
            f"processes (up to 4, one core left to the scorer); scoring took {rows_rate:,.0f} rows/s",
        },
    ]


@check("throughput, SmolLM2-1.7B shape", timeout=600)
def _throughput_smollm2():
    return throughput("SmolLM2-1.7B")


@check("throughput, Qwen2.5-1.5B shape", timeout=600)
def _throughput_qwen():
    return throughput("Qwen2.5-1.5B")


@check("peak GPU memory: 8,192-token rows, 152k vocabulary", timeout=600)
def _memory():
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from curate.backends.hf import HFScorer

    length = 512 if DRY else 8192
    path = build_model("Qwen2.5-1.5B")
    seqs = token_ids(4, long=length)
    scorer = HFScorer(path, dtype="float32" if DRY else "bfloat16", device=device(), batch_tokens=4 * length)
    weights = torch.cuda.memory_allocated() if not DRY else 0
    if not DRY:
        torch.cuda.reset_peak_memory_stats()
    got = scorer.score(seqs)
    finite = all(np.isfinite(lp[1:]).all() and np.isfinite(ent[1:]).all() for lp, ent in got)
    if DRY:
        return {"ok": finite, "detail": f"4 rows x {length} tokens scored, all finite (memory is measured on a GPU)"}
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    full_logits = 4 * length * 151936 * 4
    return {
        "ok": finite and peak < 0.9 * total,
        "detail": f"4 rows x {length:,} tokens in one batch: peak {peak / 2**30:.1f} GiB "
        f"({(peak - weights) / 2**30:.1f} above the weights) of {total / 2**30:.0f} GiB; the batch's full fp32 logits "
        "alone would be "
        f"{full_logits / 2**30:.1f} GiB; all scores finite",
    }


@check("Q-Tuning inside the trainer: its cost per training step, SmolLM2-1.7B shape", timeout=600)
def _in_trainer():
    """A full fine-tuning step (bf16 weights, AdamW) of 8 rows x 1,024 tokens, half of them labelled: the model's own
    loss against the in-trainer loss's GPU work from the same forward's logits (`curate.dynamic.token_statistics`:
    the log-softmax at the labelled positions, the entropy over the vocabulary there, the kept-token loss). The
    triage and the token masks run on the CPU (polars, which this machine lacks; milliseconds a micro-batch:
    BENCHMARKS.md measures the whole step on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from curate.dynamic import token_statistics

    rows, length = (2, 64) if DRY else (8, 1024)
    model = AutoModelForCausalLM.from_pretrained(build_model("SmolLM2-1.7B")).to(device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.tensor([list(r) for r in token_ids(rows, long=length)], dtype=torch.long, device=device())
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt

    def step(in_trainer: bool) -> float:
        synchronize()
        t0 = time.perf_counter()
        if in_trainer:
            logits = model(input_ids=ids).logits
            token_logp, _, _ = token_statistics(logits, labels)
            loss = -token_logp.mean()
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize()
        return time.perf_counter() - t0

    times, peaks = {}, {}
    for way in (False, True, False, True):  # warm-up, then measured, alternating
        if not DRY:
            torch.cuda.reset_peak_memory_stats()
        times.setdefault(way, []).append(step(way))
        peaks[way] = 0 if DRY else torch.cuda.max_memory_allocated()
    plain, inside = times[False][-1], times[True][-1]
    ratio = inside / plain
    memory = "" if DRY else f"; peak memory {peaks[True] / 2**30:.1f} GiB against {peaks[False] / 2**30:.1f}"
    return {
        "ok": DRY or ratio < 1.10,
        "detail": f"{rows} rows x {length:,} tokens: a step with the in-trainer loss takes {inside:.3f} s against "
        f"{plain:.3f} s with the model's own loss ({ratio:.2f}x; target under 1.10x){memory}",
    }


# The vLLM paths, where vLLM is installed (a user's GPU box after `make setup`), as they were checked before.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_vllm import register_checks  # noqa: E402

register_checks(lambda name, env=None, gpus=1, timeout=900: check(name, env, gpus, timeout, vllm=True), WORK)


# ---------------------------------------------------------------- the driver


def run_one(name: str) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    fn = CHECKS[name][0]
    try:
        result = fn()
    except Exception as e:  # a check that crashes is a FAIL with its reason
        result = {"ok": False, "detail": f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]}
    for r in result if isinstance(result, list) else [{"name": name, **result}]:
        print("RESULT " + json.dumps(r), flush=True)


def machine() -> str:
    if DRY:
        return f"dry run on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    return f"{gpu}; {os.cpu_count()} cores"


def main() -> int:
    import torch
    import transformers

    if not DRY and not torch.cuda.is_available():
        print("no CUDA GPU here (bash scripts/gpu_check.sh --dry-run runs the checks on CPU at toy shapes)")
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    has_vllm = importlib.util.find_spec("vllm") is not None
    lines, failed, started = [], 0, time.time()
    print(
        f"{machine()}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        flush=True,
    )
    gpus = 0 if DRY else torch.cuda.device_count()
    for name, (_, env, needs_gpus, timeout, needs_vllm) in CHECKS.items():
        why = None
        if needs_vllm and (DRY or not has_vllm):
            why = "dry run (vLLM needs CUDA)" if DRY else "vLLM is not installed here"
        elif needs_gpus > max(gpus, 1):
            why = f"needs {needs_gpus} GPUs, this machine has {gpus}"
        if why:
            lines.append((name, "SKIP", why))
            print(f"SKIP: {why}: {name}", flush=True)
            continue
        t0 = time.time()
        command = [sys.executable, __file__, "--one", name, *(["--dry-run"] if DRY else [])]
        try:
            run_env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **env}
            res = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=run_env)
            found = [json.loads(ln[7:]) for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            results = found or [{"name": name, "ok": False, "detail": " ".join(res.stderr[-600:].split())}]
        except subprocess.TimeoutExpired:
            results = [{"name": name, "ok": False, "detail": f"did not finish in {timeout} s"}]
        for r in results:
            status = "PASS" if r["ok"] else "FAIL"
            failed += not r["ok"]
            lines.append((r["name"], status, f"{r['detail']} ({time.time() - t0:.0f} s)"))
            print(f"{status} {r['name']}: {lines[-1][2]}", flush=True)
    md = [
        "## GPU check (`bash scripts/gpu_check.sh`)" + (" — dry run on CPU, toy shapes" if DRY else ""),
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Date: {time.strftime('%Y-%m-%d')}. All checks: {time.time() - started:.0f} s.",
        "",
        "| check | result | details |",
        "|---|---|---|",
    ]
    md += [f"| {n} | {s} | {d.replace('|', '/')} |" for n, s, d in lines]
    target = WORK / "gpu_check.dry-run.md" if DRY else OUT
    target.write_text("\n".join(md) + "\n")
    print(f"wrote {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    if "--one" in sys.argv:
        run_one(sys.argv[sys.argv.index("--one") + 1])
    else:
        sys.exit(main())
