import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import io, schema
from curate.cli import app
from curate.config import ScoreConfig
from curate.errors import CurateError
from curate.stages.score import run

from .conftest import GSM8K_TEST, Recorder, needs_shared, reference_scores, write_jsonl

ROWS = [
    {"messages": [{"role": "user", "content": f"the fox {i}"}, {"role": "assistant", "content": "jumps " * (i + 1)}]}
    for i in range(7)
]


def read_all(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist() if list(out.glob("part-*.parquet")) else []


def test_score_writes_the_contract(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS + ["{broken", {"messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "scores"
    # float32: the scores are compared with an fp32 reference below (--dtype auto is bf16 on CPUs that have it)
    manifest = run(ScoreConfig(input=str(data), out=str(out), model=str(tiny_model_dir), shard_size=3, dtype="fp32"))
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(files[0])
    assert table.schema.remove_metadata().equals(schema.SCORES)
    meta = io.parquet_metadata(files[0])
    for key in (
        "model",
        "model_hash",
        "tokenizer",
        "chat_template_hash",
        "backend",
        "dtype",
        "max_length",
        "curate_version",
        "entropy_method",
    ):
        assert meta[key], key
    assert meta["backend"] == "hf" and meta["dtype"] == "float32" and meta["entropy_method"] == "exact"
    rows = read_all(out)
    assert len(rows) == 7 and manifest["counts"]["samples"] == 7
    assert manifest["skipped_by_reason"] == {"invalid_json": 1, "no_assistant_turn": 1}
    assert manifest["skipped_examples"][0]["row"] == 8
    for r in rows:
        lp, ent = reference_scores(tiny_model_dir, r["input_ids"])
        assert np.max(np.abs(np.array(r["logprob"][1:]) - lp)) <= 1e-4
        assert np.max(np.abs(np.array(r["entropy"][1:]) - ent)) <= 1e-4
        assert r["n_trainable"] == sum(r["trainable"]) > 0 and r["n_tokens"] == len(r["input_ids"])
    assert json.loads((out / "_manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]


def test_rerun_is_noop_and_interrupted_run_resumes_identically(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    cfg = ScoreConfig(input=str(data), out=str(tmp_path / "full"), model=str(tiny_model_dir), shard_size=2)
    run(cfg)
    full = read_all(tmp_path / "full")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "full").iterdir()}
    rec = Recorder()
    run(cfg, rec)
    assert any("nothing to do" in m for m in rec.logs)
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "full").iterdir()}

    class Interrupt(Exception):
        pass

    def stop_after_first_shard(rows, tokens):
        if rows > 2:  # inside the second shard, after the first was written
            raise Interrupt

    part = cfg.model_copy(update={"out": str(tmp_path / "part")})
    with pytest.raises(Interrupt):
        run(part, Recorder(stop_after_first_shard))
    assert [p.name for p in (tmp_path / "part").glob("part-*")] == ["part-00000.parquet"]
    assert not (tmp_path / "part" / "_manifest.json").exists()
    manifest = run(part)
    assert manifest["scoring"]["tokens_scored_this_run"] < manifest["counts"]["tokens"]  # shard 0 reused
    assert json.dumps(read_all(tmp_path / "part")) == json.dumps(full)  # NaN-safe equality

    changed = part.model_copy(update={"max_length": 64})
    with pytest.raises(CurateError, match="--force"):
        run(changed)
    run(changed, force=True)


def test_fail_mode_names_file_row_and_field(tmp_path, tiny_model_dir):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
    data = write_jsonl(tmp_path / "in.jsonl", ROWS[:2] + [bad])
    with pytest.raises(CurateError, match=r"in\.jsonl, row 3, field 'messages\[1\]\.role'.*unknown_role"):
        run(ScoreConfig(input=str(data), out=str(tmp_path / "o"), model=str(tiny_model_dir), on_bad_row="fail"))


@needs_shared
@pytest.mark.slow
def test_cli_scores_gsm8k_with_builtin_model(smollm2_gsm8k, smollm2_dir):
    out, output = smollm2_gsm8k
    assert "samples scored" in output
    rows = read_all(out)
    assert len(rows) == 64
    first = json.loads(open(GSM8K_TEST).readline())
    assert rows[0]["messages"][-1]["content"] == first["answer"]
    for r in rows[:3]:
        lp, ent = reference_scores(smollm2_dir, r["input_ids"])
        assert np.max(np.abs(np.array(r["logprob"][1:]) - lp)) <= 1e-4
        assert np.max(np.abs(np.array(r["entropy"][1:]) - ent)) <= 1e-4


def test_cli_reports_bad_input_without_traceback(tmp_path):
    res = CliRunner().invoke(app, ["score", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such file" in res.output and "Traceback" not in res.output


def test_duplicates_are_counted_and_dropped_with_dedup(tmp_path, tiny_model_dir):
    twin = {"messages": ROWS[1]["messages"], "id": "twin"}  # the same conversation as row 2, under another id
    again = {**ROWS[3], "id": "r3"}
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "id": "r3"}, twin, again, ROWS[4], ROWS[1]]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    kept = run(ScoreConfig(input=str(data), out=str(tmp_path / "a"), model=str(tiny_model_dir), shard_size=2))
    assert kept["duplicates"]["groups"] == 1 and kept["duplicates"]["later_copies"] == 2
    assert kept["skipped_by_reason"] == {"duplicate_id": 1}  # "r3" twice: the later row is dropped
    assert kept["counts"]["samples"] == 6
    dropped = run(
        ScoreConfig(input=str(data), out=str(tmp_path / "b"), model=str(tiny_model_dir), shard_size=2, dedup=True)
    )
    assert dropped["skipped_by_reason"] == {"duplicate_id": 1, "duplicate_content": 2}
    ids = [r["id"] for r in read_all(tmp_path / "b")]
    assert len(ids) == 4 and "twin" not in ids and len(set(ids)) == 4
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "b")])  # the rewritten shards are the ones listed
    assert res.exit_code == 0, res.output


def test_trainable_only_scores_give_the_same_selection(tmp_path, tiny_model_dir):
    import polars as pl

    from curate.config import PruneConfig
    from curate.stages import prune

    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    for positions in ("all", "trainable"):
        run(ScoreConfig(input=str(data), out=str(tmp_path / positions), model=str(tiny_model_dir), positions=positions))
        prune.run(PruneConfig(scores=str(tmp_path / positions), out=str(tmp_path / f"p-{positions}"), ratio=0.5))
    full, part = read_all(tmp_path / "all"), read_all(tmp_path / "trainable")
    for a, b in zip(full, part):
        t = np.array(a["trainable"], bool)
        assert np.allclose(np.array(a["logprob"])[t], np.array(b["logprob"])[t], atol=1e-5)
        assert np.isnan(np.array(b["entropy"])[~t]).all()  # the prompt is not scored
    cols = ["id", "ppl", "ent", "selection"]
    a, b = (pl.read_parquet(tmp_path / f"p-{p}" / "samples.parquet", columns=cols) for p in ("all", "trainable"))
    assert a["id"].to_list() == b["id"].to_list() and a["selection"].to_list() == b["selection"].to_list()
    assert np.allclose(a["ppl"].to_numpy(), b["ppl"].to_numpy(), rtol=1e-5)
    with pytest.raises(CurateError, match="--positions all"):
        prune.run(PruneConfig(scores=str(tmp_path / "trainable"), out=str(tmp_path / "x"), entropy_positions="all"))


def test_tokenising_ahead_in_processes_writes_the_same_shards(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "in.jsonl", ROWS * 3)
    inline = run(ScoreConfig(input=str(data), out=str(tmp_path / "a"), model=str(tiny_model_dir), shard_size=4))
    ahead = run(
        ScoreConfig(
            input=str(data), out=str(tmp_path / "b"), model=str(tiny_model_dir), shard_size=4, tokenize_workers=2
        )
    )
    assert inline["fingerprint"] == ahead["fingerprint"]  # not a setting that changes the result...
    assert [f["blake2b"] for f in inline["files"]] == [f["blake2b"] for f in ahead["files"]]  # ...to the byte


def test_dtype_auto_follows_native_bf16_and_cuda():
    from curate.backends import choose_dtype, cpu_bf16_feature

    sapphire = {"avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
    skylake = {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False, "avx2": True}
    assert cpu_bf16_feature(sapphire) == "amx_bf16" and cpu_bf16_feature({"avx512_bf16": True}) == "avx512_bf16"
    assert cpu_bf16_feature(skylake) is None and cpu_bf16_feature({}) is None
    assert choose_dtype("auto", "cpu", cpu_bf16_feature(sapphire)) == (
        "bfloat16",
        "auto: native bf16 on this CPU (amx_bf16)",
    )
    assert choose_dtype("auto", "cpu", cpu_bf16_feature(skylake))[0] == "float32"
    assert choose_dtype("auto", "cuda:0")[0] == "bfloat16"
    assert choose_dtype("float32", "cuda", "amx_bf16") == ("float32", "requested")
    # this machine: what torch reports decides, and a plain run records it
    assert cpu_bf16_feature() in (None, "amx_bf16", "avx512_bf16")


def test_a_resumed_auto_run_keeps_the_dtype_it_started_with(tmp_path, tiny_model_dir, monkeypatch):
    """Started where auto means bf16, resumed where auto would mean fp32 (or the other way round): one dtype."""
    import curate.backends as backends

    here = backends.cpu_bf16_feature()
    there = None if here else "amx_bf16"  # the other kind of CPU
    data = write_jsonl(tmp_path / "in.jsonl", ROWS)
    cfg = ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir), shard_size=2)

    class Interrupt(Exception):
        pass

    def stop_in_second_shard(rows, tokens):
        if rows > 2:
            raise Interrupt

    monkeypatch.setattr(backends, "cpu_bf16_feature", lambda capabilities=None: there)
    with pytest.raises(Interrupt):
        run(cfg, Recorder(stop_in_second_shard))
    started = io.parquet_metadata(tmp_path / "s" / "part-00000.parquet")["dtype"]
    assert started == ("bfloat16" if there else "float32")
    monkeypatch.undo()
    manifest = run(cfg)
    assert manifest["scoring"]["tokens_scored_this_run"] < manifest["counts"]["tokens"]  # resumed, not redone
    assert {io.parquet_metadata(p)["dtype"] for p in (tmp_path / "s").glob("part-*.parquet")} == {started}
    assert manifest["dtype"]["dtype"] == started and "as this run started" in manifest["dtype"]["why"]
    assert manifest["config"]["dtype"] == started


def test_num_workers_is_read_as_workers_with_a_notice_and_fingerprinted_as_before(tmp_path, tiny_model_dir, capsys):
    """score's --num-workers and prune's --workers are one idea, one name: the old one still works (a file, the API,
    the command line), says so once, and no run's identity changes."""
    from curate.config import base, load_pipeline
    from curate.executor import fingerprinted_config
    from curate.registry import get

    base.NOTICED.clear()
    assert ScoreConfig(input="a", out="b", num_workers=3).workers == 3
    assert capsys.readouterr().err.count("note: num_workers (--num-workers) is now workers (--workers)") == 1
    with pytest.raises(ValueError, match="num_workers is the former name of workers: give workers only"):
        ScoreConfig(input="a", out="b", num_workers=3, workers=2)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("run_dir: run\nscore: {input: d.jsonl, num_workers: 2}\nprune: {workers: 2}\n")
    p = load_pipeline(pipeline)
    assert p.score.workers == 2 and p.prune.workers == 2 and "num_workers" not in p.model_dump()["score"]
    # a run of a config with sections is identified as before the rename: the field under its former name
    assert "num_workers" in fingerprinted_config(p, get("run"))["score"]
    from curate.stages.score import SHARDS

    assert SHARDS.resources(ScoreConfig(input="a", out="b", engine="ray", num_workers=3)).workers == 3  # Ray's pool
    plain = ScoreConfig(input="a", out="b")
    assert fingerprinted_config(plain, get("score")) == fingerprinted_config(
        plain.model_copy(update={"workers": 4}), get("score")
    )

    base.NOTICED.clear()
    data = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    args = ["score", str(data), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--num-workers", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "is now workers" in res.output and io.read_manifest(tmp_path / "s")["config"]["workers"] == 2
    bad = CliRunner().invoke(app, [*args[:-1], "0"])
    assert bad.exit_code == 2 and "--workers" in bad.output  # named by its one name
