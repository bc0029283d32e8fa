import numpy as np
import pytest
import torch

from curate.backends.hf import HFScorer, chunked_logprob_entropy, logprob_entropy, token_budget_batches

from .conftest import reference_scores


def check_against_reference(model_dir, seqs, results, tol):
    assert len(results) == len(seqs)
    for ids, (lp, ent) in zip(seqs, results):
        ref_lp, ref_ent = reference_scores(model_dir, ids)
        assert lp.dtype == np.float32 and len(lp) == len(ids) == len(ent)
        assert np.isnan(lp[0]) and np.isnan(ent[0])
        assert np.max(np.abs(lp[1:] - ref_lp)) <= tol
        assert np.max(np.abs(ent[1:] - ref_ent)) <= tol


def test_tiny_model_matches_log_softmax_across_padding_chunks_and_batches(tiny_model_dir):
    rng = np.random.default_rng(0)
    lengths = [2, 3, 17, 64, 65, 200, 31, 5, 128, 9]
    seqs = [rng.integers(0, 400, size=n).astype(np.int32) for n in lengths]
    scorer = HFScorer(str(tiny_model_dir), dtype="float32", device="cpu", batch_tokens=256)
    scorer.chunk = 7  # force many logits chunks that straddle row boundaries
    seen = []
    results = scorer.score(seqs, on_batch=lambda rows, toks: seen.append(rows))
    assert sum(seen) == len(seqs) and len(seen) > 3  # several padded batches
    check_against_reference(tiny_model_dir, seqs, results, 1e-4)
    # entropy varies and is bounded by log(V)
    ents = np.concatenate([e[1:] for _, e in results])
    assert ents.std() > 0.05 and ents.max() <= np.log(400) + 1e-4 and ents.min() >= 0


@pytest.mark.slow
def test_smollm2_matches_log_softmax(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["What is 2 + 3? The answer is 5.", "Write a haiku about the sea.", "Hello there"]
    seqs = [np.asarray(tok(t)["input_ids"], dtype=np.int32) for t in texts]
    results = HFScorer(str(smollm2_dir), dtype="float32", device="cpu", batch_tokens=24).score(seqs)
    check_against_reference(smollm2_dir, seqs, results, 1e-4)


def test_chunking_is_exact_and_batches_respect_budget():
    torch.manual_seed(0)
    hidden = torch.randn(50, 8)
    head = torch.nn.Linear(8, 33, bias=False)
    targets = torch.randint(0, 33, (50,))
    whole = logprob_entropy(head(hidden), targets)
    for chunk in (1, 7, 50, 64):
        part = chunked_logprob_entropy(hidden, head, targets, chunk)
        assert torch.allclose(whole[0], part[0]) and torch.allclose(whole[1], part[1])
    lengths = [5, 100, 3, 40, 40, 41, 7, 300]
    batches = token_budget_batches(lengths, 120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120
