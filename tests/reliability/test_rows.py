"""One bad row never ends a run: each hostile row is a counted skip with its reason (or, with --on-bad-row fail,
a stop naming file, row and field); impossible score values are refused, naming file and sample."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import io, schema
from curate.cli import app
from curate.config import PruneConfig, ScoreConfig
from curate.errors import CurateError
from curate.stages import prune, score

from ..conftest import build_tiny_model_dir, restamp
from .test_templates import NO_SYSTEM_ROLE


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"the fox {i}"}, {"role": "assistant", "content": f"jumps {i}"}]}


def line(obj) -> bytes:
    return (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n"


HOSTILE = {  # reason -> one JSONL line
    "invalid_json": b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",  # nested too deeply
    "unknown_role": line({"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}),
    "invalid_unicode": b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}',
    "invalid_utf8": b'{"messages": [{"role": "user", "content": "caf\xff"}, {"role": "assistant", "content": "y"}]}',
    "missing_field": line({"foo": 1, "bar": 2}),
    "template_error": line({"messages": [{"role": "system", "content": "be brief"}, *good(99)["messages"]]}),
}


@pytest.fixture(scope="module")
def strict_model(tmp_path_factory):
    """A tiny model whose template refuses system messages."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("no-system"), NO_SYSTEM_ROLE)


def hostile_file(path, bom=False):
    lines = [HOSTILE["missing_field"]]  # an unrecognisable FIRST row: the majority decides the format
    for i, bad in enumerate(HOSTILE.values()):
        lines += [line(good(i)), bad if bad.endswith(b"\n") else bad + b"\n"]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"".join(lines))
    return path


def test_every_hostile_row_is_a_counted_skip(tmp_path, strict_model):
    data = hostile_file(tmp_path / "hostile.jsonl", bom=True)
    manifest = score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(strict_model)))
    assert manifest["counts"]["samples"] == len(HOSTILE)  # every good row, the BOM's row included
    assert manifest["skipped_by_reason"] == {reason: 2 if reason == "missing_field" else 1 for reason in HOSTILE}
    assert manifest["config"]["format"] == "openai"
    rows = {e["reason"]: e for e in manifest["skipped_examples"]}
    assert rows["invalid_utf8"]["row"] == 9 and "0xff" in rows["invalid_utf8"]["message"]
    assert rows["unknown_role"]["field"] == "messages[0].role"
    assert rows["invalid_unicode"]["field"] == "messages[0].content"


def test_fail_mode_names_the_row_of_a_byte_that_is_not_utf8(tmp_path, tiny_model_dir):
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(line(good(0)) + line(good(1)) + HOSTILE["invalid_utf8"] + b"\n" + line(good(2)))
    res = CliRunner().invoke(
        app, ["score", str(data), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--on-bad-row", "fail"]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "hostile.jsonl, row 3" in res.output and "0xff" in res.output and "[invalid_utf8]" in res.output


def test_json_arrays_with_a_bom_and_a_broken_element(tmp_path, tiny_model_dir):
    rows = [json.dumps(good(i)) for i in range(4)]
    rows.insert(2, '{"messages": [1, 2,]}')  # invalid JSON inside the array
    data = tmp_path / "array.json"
    data.write_bytes(b"\xef\xbb\xbf[" + ",\n".join(rows).encode() + b"]")
    manifest = score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir)))
    assert manifest["counts"]["samples"] == 4 and manifest["skipped_by_reason"] == {"invalid_json": 1}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("scored")
    data = d / "in.jsonl"
    data.write_bytes(b"".join(line(good(i)) for i in range(12)))
    score.run(ScoreConfig(input=str(data), out=str(d / "scores"), model=str(tiny_model_dir), shard_size=6))
    return d / "scores"


def doctor(column, value):
    def apply(row):
        row[column] = value(row[column])

    return apply


IMPOSSIBLE = {
    "-inf log-prob": (doctor("logprob", lambda v: v[:1] + [float("-inf")] + v[2:]), "NaN scores"),
    "+50 log-prob": (doctor("logprob", lambda v: v[:1] + [50.0] + v[2:]), "log-probs above 0"),
    "+inf entropy": (doctor("entropy", lambda v: v[:1] + [float("inf")] + v[2:]), "NaN scores"),
    "negative entropy": (doctor("entropy", lambda v: v[:1] + [-3.0] + v[2:]), "entropies outside"),
    "huge entropy": (doctor("entropy", lambda v: v[:1] + [1000.0] + v[2:]), "entropies outside"),
    "null value": (doctor("entropy", lambda v: v[:1] + [None] + v[2:]), "NaN scores"),
    "ragged lists": (doctor("logprob", lambda v: v[:-1]), "ragged"),
    "null list": (doctor("trainable", lambda v: None), "ragged"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_scores_are_refused_naming_file_and_sample(tmp_path, scored, case):
    change, message = IMPOSSIBLE[case]
    bad = tmp_path / "scores"
    bad.mkdir()
    for f in scored.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "part-00001.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    change(rows[3])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    restamp(bad)  # as if the scorer itself had written these values
    with pytest.raises(CurateError, match=rf"part-00001.parquet: sample '{rows[3]['id']}' .*{message}"):
        prune.run(PruneConfig(scores=str(bad), out=str(tmp_path / "p")))
    assert not (tmp_path / "p" / io.MANIFEST).exists()


def test_scores_are_checked_when_written(tmp_path, tiny_model_dir):
    import numpy as np

    from curate.scoring import score_problem

    ok = np.array([np.nan, -0.5, -2.0], np.float32), np.array([np.nan, 1.0, 2.0], np.float32)
    assert score_problem(*ok, 3, 100) is None
    assert "non-finite" in score_problem(ok[0], np.array([np.nan, np.inf, 1], np.float32), 3, 100)
    assert "> 0" in score_problem(np.array([np.nan, 3.0, -1], np.float32), ok[1], 3, 100)
    assert "outside" in score_problem(ok[0], np.array([np.nan, 9.0, 1], np.float32), 3, 100)  # log 100 = 4.6
    assert "for 4 tokens" in score_problem(*ok, 4, 100)
    assert schema.SCORES.field("content_hash")  # duplicates are found by content hash
