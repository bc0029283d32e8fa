"""Sample strategies as declarations, and IFD: the answer's perplexity after the instruction over its perplexity
alone, checked against a plain transformers computation."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from curate import pruning, strategies
from curate.config import PruneConfig, ScoreConfig
from curate.errors import CurateError
from curate.progress import Reporter
from curate.scoring import RowsByTokens
from curate.stages import prune, score

from .conftest import reference_scores, write_jsonl

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"the quick fox {i}"},
            {"role": "assistant", "content": "jumps over the lazy dog " * (1 + i % 3)},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}"},
        ]
    }
    for i in range(9)
] + [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]  # one token alone


@pytest.fixture(scope="module")
def ifd_scores(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("ifd")
    data = write_jsonl(d / "rows.jsonl", ROWS)
    cfg = ScoreConfig(input=str(data), out=str(d / "scores"), model=str(tiny_model_dir), dtype="fp32", shard_size=4)
    score.run(cfg.model_copy(update={"signals": ["ifd"]}))
    return d / "scores"


def test_ppl_alone_and_ifd_match_plain_transformers(ifd_scores, tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pq.read_table(sorted(ifd_scores.glob("part-*.parquet"))).to_pylist()
    prune.run(PruneConfig(scores=str(ifd_scores), out=str(tmp_path / "p"), ratio=0.5, strategy="ifd"))
    samples = {s["id"]: s for s in pq.read_table(tmp_path / "p" / "samples.parquet").to_pylist()}
    for r in rows:
        nll, n = 0.0, 0
        for m in r["messages"]:
            if m["role"] == "assistant":
                ids = tok(m["content"])["input_ids"]  # the tokenizer's defaults, no template
                if len(ids) > 1:
                    lp, _ = reference_scores(tiny_model_dir, ids)
                    nll, n = nll - float(lp.sum()), n + len(lp)
        s = samples[r["id"]]
        if n == 0:  # nothing to score alone: no IFD
            assert s["ppl_alone"] is None and s["ifd"] is None
            continue
        want_alone = math.exp(nll / n)
        assert s["ppl_alone"] == pytest.approx(want_alone, rel=1e-4)
        lp, _ = reference_scores(tiny_model_dir, r["input_ids"])
        train = np.array(r["trainable"][1:], bool)
        conditioned = math.exp(-float(lp[train].mean()))  # every assistant token, end-of-turn markers included
        assert s["ifd"] == pytest.approx(conditioned / want_alone, rel=1e-4)


class Recorder(Reporter):
    def __init__(self):
        self.done = []

    def start(self, label, total, unit="rows"):
        self.total = total

    def advance(self, done, tokens=0):
        self.done.append((done, tokens))


def test_with_ifd_the_rows_advance_through_both_passes(tmp_path, tiny_model_dir):
    """The answers alone are a second pass over the same rows: the bar moves through it, not to 100% in the first
    pass and still through the second."""
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir), dtype="fp32", batch_tokens=2)
    rec = Recorder()
    score.run(cfg.model_copy(update={"signals": ["ifd"]}), reporter=rec)
    rows = [done for done, _ in rec.done]
    assert rows == sorted(rows) and rows[-1] == rec.total == len(ROWS)
    # all rows done only with the last batch of answers (then the shard's end): not through the whole second pass
    assert rows.index(len(ROWS)) >= len(rows) - 2 and len(set(rows)) > len(ROWS) // 2


def test_rows_by_tokens_hands_on_every_token_and_every_row_once():
    seen = []
    progress = RowsByTokens(lambda rows, tokens: seen.append((rows, tokens)), rows=3, total=10)
    for rows, tokens in [(1, 4), (1, 2), (0, 1), (0, 3)]:  # a first pass over 6 tokens, then a second over 4
        progress(rows, tokens)
    assert seen == [(1, 4), (0, 2), (1, 1), (1, 3)]


def test_ifd_needs_the_signal(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir), dtype="fp32"))
    with pytest.raises(CurateError, match="--strategy ifd needs the scores' ifd signal.*--signals ifd"):
        prune.run(PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "p"), strategy="ifd"))


def table(ppl, ent, ifd, n_trainable):
    n = len(ppl)
    return {
        "id": np.array([f"s{i:03d}" for i in range(n)]),
        "ppl": np.array(ppl),
        "ent": np.array(ent),
        "ifd": np.array(ifd, dtype=np.float64),
        "n_trainable": np.array(n_trainable),
    }


@settings(max_examples=150, deadline=None)
@given(data=st.data(), ratio=st.floats(0.01, 1.0))
def test_every_strategy_keeps_exactly_k_and_ifd_prefers_every_aligned_sample(data, ratio):
    n = data.draw(st.integers(1, 50))
    floats = st.floats(0.5, 60, allow_nan=False)
    ppl = data.draw(st.lists(floats, min_size=n, max_size=n))
    ent = data.draw(st.lists(st.floats(0.0, 5, allow_nan=False), min_size=n, max_size=n))
    ifd = data.draw(st.lists(st.one_of(st.floats(0.1, 3.0), st.just(math.nan)), min_size=n, max_size=n))
    lengths = data.draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    t = table(ppl, ent, ifd, lengths)
    k = pruning.budget(ratio, n)
    for s in strategies.REGISTRY.values():
        kept = s.select(t, k, 7, "rank").selection != None  # noqa: E711 (elementwise on an object array)
        assert kept.sum() == k, s.name
    kept = strategies.get("ifd").select(t, k, 7, "rank").selection != None  # noqa: E711
    aligned = np.isfinite(t["ifd"]) & (t["ifd"] < 1)
    assert not (kept & ~aligned).any() or kept[aligned].all()  # IFD >= 1 only once every IFD < 1 is kept
    if kept[aligned].any() and (aligned & ~kept).any():  # and among IFD < 1, the highest first
        assert t["ifd"][kept & aligned].min() >= t["ifd"][aligned & ~kept].max()
    longest = strategies.get("longest").select(t, k, 7, "rank").selection != None  # noqa: E711
    if (~longest).any():
        assert t["n_trainable"][longest].min() >= t["n_trainable"][~longest].max()


def test_a_strategy_registered_from_outside_is_in_prune_probe_and_experiment(tmp_path, ifd_scores):
    """One declaration, no other edit: the CLI, the config, the probe's table and the experiment's arms take it."""
    from typer.testing import CliRunner

    from curate.arms import arm_settings
    from curate.cli import app
    from curate.config import ExperimentConfig
    from curate.stages.probe import probe_table

    toy = strategies.Strategy(
        "shortest-toy",
        "the fewest trainable tokens first",
        strategies.ranked("shortest-toy", lambda t: t["n_trainable"]),
        needs=("n_trainable",),
    )
    strategies.register(toy)
    try:
        out = tmp_path / "p"
        done = CliRunner().invoke(app, ["prune", str(ifd_scores), "--out", str(out), "--strategy", "shortest-toy"])
        assert done.exit_code == 0, done.output
        samples = pl.read_parquet(out / "samples.parquet")
        kept = samples.filter(pl.col("kept"))
        assert set(kept["selection"]) == {"shortest-toy"}
        assert kept["n_trainable"].max() <= samples.filter(~pl.col("kept"))["n_trainable"].min()
        coords = samples.with_columns(duplicate_of=pl.lit(None, pl.String))
        from curate.config import ProbeConfig

        table_ = probe_table(coords, {}, ProbeConfig(input="x", out="y"))
        assert "shortest-toy" in table_["placements"]["max-turn"]
        cfg = ExperimentConfig.model_validate(
            {
                "run_dir": str(tmp_path / "e"),
                "train_data": "x",
                "eval": {"data": "y"},
                "budgets": [{"ratio": 0.25, "token_ratio": 0.5, "arms": ["shortest-toy"]}],
            }
        )
        assert arm_settings("shortest-toy") == {"strategy": "shortest-toy", "token_strategy": "qtuning"}
        assert cfg.budgets[0].arms == ["shortest-toy"]
    finally:
        strategies.REGISTRY.pop("shortest-toy")


def test_a_strategy_declares_which_of_its_selections_get_token_pruning():
    """Q-Tuning prunes the tokens of its misconceptions (Q2, fill-Q2) only; a strategy that keeps whole samples
    declares no label; by default every sample a strategy keeps (labelled with its name) is pruned."""
    qtuning = strategies.get("qtuning")
    assert [s for s in ("Q1", "Q2", "Q3", "Q4", "fill-Q2", "fill-Q4", None) if qtuning.tokens_pruned(s)] == [
        "Q2",
        "fill-Q2",
    ]
    assert strategies.get("random").tokens_pruned("random") and not strategies.get("ifd").tokens_pruned("ifd")
    select = strategies.ranked("two-kinds", lambda t: t["ppl"])
    toy = strategies.Strategy("two-kinds", "toy", select, pruned_labels=("two-kinds-a",))
    assert toy.prunes_tokens and toy.tokens_pruned("two-kinds-a") and not toy.tokens_pruned("two-kinds")
    assert not strategies.Strategy("whole", "toy", select, pruned_labels=()).prunes_tokens
