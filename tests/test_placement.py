"""Per-turn coordinates and where a conversation sits (pruning.place), the corruptions and `curate probe`."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import corrupt, pruning
from curate.cli import app
from curate.config import PruneConfig, ScoreConfig
from curate.stages import probe as probe_stage
from curate.stages import prune, score

from .conftest import DEMO, GLAIVE, needs_shared


@pytest.fixture(scope="module")
def mixed_scores(tmp_path_factory, tiny_model_dir):
    """Tiny-model scores of 60 demo rows: single-turn rows and three-turn conversations."""
    rows = [json.loads(line) for line in open(DEMO)]
    single = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) == 1][:40]
    multi = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1][:20]
    d = tmp_path_factory.mktemp("mixed")
    for name, part in (("single", single), ("mixed", single + multi)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        score.run(ScoreConfig(input=str(d / f"{name}.jsonl"), out=str(d / name), model=str(tiny_model_dir)))
    return d


def bf_turns(row):
    """(ppl, ent) of each run of trainable tokens, from the raw lists."""
    t = np.array(row["trainable"])
    lp, ent = np.array(row["logprob"], np.float64), np.array(row["entropy"], np.float64)
    turns, start = [], None
    for i in range(len(t) + 1):
        on = i < len(t) and t[i] == 1
        if on and start is None:
            start = i
        if not on and start is not None:
            turns.append((float(np.exp(-lp[start:i].mean())), float(ent[start:i].mean())))
            start = None
    return turns


def test_turn_coordinates_and_worst_turn_match_brute_force(mixed_scores, tmp_path):
    out = tmp_path / "p"
    prune.run(PruneConfig(scores=str(mixed_scores / "mixed"), out=str(out), ratio=0.3, placement="worst-turn"))
    samples = {s["id"]: s for s in pq.read_table(out / "samples.parquet").to_pylist()}
    raw = pq.read_table(sorted((mixed_scores / "mixed").glob("part-*.parquet"))).to_pylist()
    multi = 0
    for r in raw:
        turns, s = bf_turns(r), samples[r["id"]]
        assert np.allclose(s["turn_ppl"], [p for p, _ in turns]) and np.allclose(s["turn_ent"], [e for _, e in turns])
        if len(turns) > 1:
            multi += 1
            worst = max(turns, key=lambda pe: pe[0])
            assert s["ppl"] == pytest.approx(worst[0]) and s["ent"] == pytest.approx(worst[1])
    assert multi == 20
    assert json.loads((out / "stats.json").read_text())["multi_turn_samples"] == 20


def test_single_turn_selections_are_identical_under_every_placement(mixed_scores, tmp_path):
    tables = {}
    for placement in pruning.PLACEMENTS:
        out = tmp_path / placement
        prune.run(PruneConfig(scores=str(mixed_scores / "single"), out=str(out), ratio=0.25, placement=placement))
        # the files differ only in the run fingerprint in their metadata; their contents must be identical
        tables[placement] = [pq.read_table(out / "samples.parquet"), pq.read_table(sorted(out.glob("data/*.parquet")))]
    first, *rest = tables.values()
    for other in rest:
        assert all(a.equals(b) for a, b in zip(first, other))


def conversation(turns, question="q"):
    msgs = []
    for t in turns:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": t}]
    return msgs


def test_corruptions_are_real_errors_of_the_documented_kinds():
    call = json.dumps({"name": "convert", "arguments": {"amount": 100, "to": "EUR"}})
    reply = "The converted amount is 85.5 EUR, at today's rate of 0.855 euros to the dollar."
    # each its own question: an answer swapped between two rows asking the same is another row, not an error
    rows = [
        {"id": f"m{i}", "messages": conversation([call, reply.replace("85.5", str(80 + i))], f"q{i}")} for i in range(6)
    ]
    rows += [{"id": f"s{i}", "messages": conversation([f"The answer is {i}."], f"q{i}")} for i in range(6)]
    rows += [{"id": "x", "messages": conversation(["hi", "bye"])}]  # nothing applies
    out, bad = corrupt.corrupt(rows, 0.9, seed=0)
    assert "x" not in bad and set(bad.values()) <= set(corrupt.KINDS) and len(bad) >= 8
    for r, o in zip(rows, out):
        kind = bad.get(r["id"])
        if kind is None:
            assert o == r
            continue
        assert o["messages"] != r["messages"]
        if kind == "answer":
            assert o["messages"][-1]["content"].startswith("The answer is") and r["id"].startswith("s")
        elif kind == "reply":
            assert o["messages"][-1]["content"] != r["messages"][-1]["content"] and o["messages"][1] == r["messages"][1]
        else:
            args = json.loads(o["messages"][1]["content"])
            assert args == {"name": "convert", "arguments": {"amount": 307, "to": "EUR"}}
    assert rows[0]["messages"][1]["content"] == call  # the input is not touched


def test_probe_command_tables_every_strategy_and_placement(mixed_scores, tmp_path, tiny_model_dir):
    from curate import strategies

    out = tmp_path / "probe"
    args = ["probe", str(mixed_scores / "mixed.jsonl"), "--out", str(out), "--model", str(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--fraction", "0.3", "--random-seeds", "5", "--seeds", "0,1"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "probe.json").read_text())
    assert result["seeds"] == [0, 1] and result["samples"] == 60
    for seed in (0, 1):
        bad = json.loads((out / f"seed-{seed}" / "corrupted.json").read_text())
        one = result["per_seed"][str(seed)]
        assert one["corrupted"] == len(bad) == 18
        assert set(one["placements"]) == set(pruning.PLACEMENTS)
        for rows in one["placements"].values():
            assert set(rows) == set(strategies.names())  # IFD included: the probe scores the answers alone too
            assert all(r["kept"] == 15 for r in rows.values())
            sel = rows["qtuning"]["by_selection"]
            assert sum(s["corrupted"] for s in sel.values()) == rows["qtuning"]["corrupted"]
        # the table's Q-Tuning row is what `curate prune` keeps from the same scores
        pruned = tmp_path / f"pruned-{seed}"
        scores = out / f"seed-{seed}" / "scores"
        prune.run(PruneConfig(scores=str(scores), out=str(pruned), ratio=0.25, placement="worst-turn", seed=seed))
        kept = {s["id"] for s in pq.read_table(pruned / "samples.parquet").to_pylist() if s["kept"]}
        assert len(kept & set(bad)) == one["placements"]["worst-turn"]["qtuning"]["corrupted"]
    shares = [result["per_seed"][s]["placements"]["max-turn"]["ifd"]["share"] for s in ("0", "1")]
    assert result["placements"]["max-turn"]["ifd"]["mean"] == pytest.approx(sum(shares) / 2)
    md = (out / "probe.md").read_text()
    assert "| qtuning |" in md and "| ifd |" in md and "| (the input) |" in md and "±" in md


@needs_shared
def test_the_probe_scores_every_row_of_tool_call_data(tmp_path, tiny_model_dir):
    """The corrupted copy of glaive conversations (tool schemas, calls, tool results) reads back whole: the table
    counts every distinct conversation, and a row scoring skips would be named above the table."""
    out = tmp_path / "probe"
    args = ["probe", str(GLAIVE), "--limit", "40", "--out", str(out), "--model", str(tiny_model_dir), "--seeds", "0"]
    res = CliRunner().invoke(app, [*args, "--random-seeds", "2"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "probe.json").read_text())
    scored = json.loads((out / "seed-0" / "scores" / "_manifest.json").read_text())
    assert scored["counts"]["rows_read"] == 40 and scored["skipped_by_reason"] == {}
    assert result["samples"] + scored["duplicates"]["later_copies"] == 40
    assert result["per_seed"]["0"]["corrupted_by_kind"].get("arguments")  # tool-call arguments were altered
    assert "Rows scoring skipped" not in (out / "probe.md").read_text()
    named = probe_stage.skipped_line({"per_seed": {"0": {"skipped": {}}, "1": {"skipped": {"unknown_role": 3}}}})
    assert named == ["Rows scoring skipped (not in the table): seed 1: 3 unknown_role.", ""]


def test_report_shows_a_multi_turn_sample_turns(mixed_scores, tmp_path):
    pruned = tmp_path / "p"
    prune.run(PruneConfig(scores=str(mixed_scores / "mixed"), out=str(pruned), ratio=0.3))
    res = CliRunner().invoke(app, ["report", str(pruned), "--examples", "1"])
    assert res.exit_code == 0, res.output
    page = (pruned / "report" / "report.html").read_text()
    assert page.count("assistant turns (ppl, ent):") >= 1
    assert (pruned / "report" / "eu_plane.png").stat().st_size > 10_000
