"""Never trust a bad file: every stage verifies what it reads against the manifest that wrote it."""

import json
import os
import shutil
import socket
import subprocess

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import io
from curate.cli import app

from ..conftest import DEMO, write_jsonl

runner = CliRunner()


def text(res) -> str:
    return " ".join(res.output.split())


def table_rows(folder):
    return json.dumps(pq.read_table(sorted(folder.glob("part-*.parquet"))).to_pylist())  # NaN-safe comparison


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("reference")
    res = runner.invoke(app, score_args(d / "scores", tiny_model_dir))
    assert res.exit_code == 0, res.output
    return d / "scores"


def score_args(out, model, *extra):
    return ["score", str(DEMO), "--out", str(out), "--model", str(model), "--limit", "40", "--shard-size", "10", *extra]


def copy_scores(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "scores")
    return tmp_path / "scores"


def flip_bytes(path, n=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": (lambda s: flip_bytes(s / "part-00001.parquet"), "part-00001.parquet: checksum differs"),
    "truncated": (lambda s: os.truncate(s / "part-00001.parquet", 500), "part-00001.parquet: size 500 bytes"),
    "deleted": (lambda s: (s / "part-00001.parquet").unlink(), "part-00001.parquet: missing"),
    "stray": (
        lambda s: shutil.copy(s / "part-00000.parquet", s / "part-00007.parquet"),
        "part-00007.parquet: not written by this run",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_scores_are_named_then_repaired_by_rerunning_score(tmp_path, reference, tiny_model_dir, damage):
    scores = copy_scores(reference, tmp_path)
    apply, message = DAMAGE[damage]
    apply(scores)
    res = runner.invoke(app, ["prune", str(scores), "--out", str(tmp_path / "pruned")])
    assert res.exit_code == 2 and message in text(res) and "Traceback" not in res.output, res.output
    assert not (tmp_path / "pruned" / io.MANIFEST).exists()
    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and message.split(":")[0] in text(res)
    res = runner.invoke(app, score_args(scores, tiny_model_dir))  # the same command repairs the run
    assert res.exit_code == 0 and "recomputing it" in text(res), res.output
    assert table_rows(scores) == table_rows(reference)
    assert sorted(p.name for p in scores.glob("part-*")) == sorted(p.name for p in reference.glob("part-*"))
    assert runner.invoke(app, ["verify", str(scores)]).exit_code == 0
    assert runner.invoke(app, ["prune", str(scores), "--out", str(tmp_path / "pruned")]).exit_code == 0


def test_a_stage_never_writes_over_its_input_or_another_stage(tmp_path, reference):
    scores = copy_scores(reference, tmp_path)
    before = (scores / io.MANIFEST).read_bytes()
    res = runner.invoke(app, ["prune", str(scores), "--out", str(scores)])
    assert res.exit_code == 2 and "is the input folder itself" in text(res)
    assert (scores / io.MANIFEST).read_bytes() == before
    res = runner.invoke(app, ["prune", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "no such folder" in text(res)
    assert runner.invoke(app, ["prune", str(scores), "--out", str(tmp_path / "p")]).exit_code == 0
    res = runner.invoke(app, ["prune", str(tmp_path / "p"), "--out", str(tmp_path / "q")])  # a prune folder as scores
    assert res.exit_code == 2 and "holds the output of `curate prune` (pruned), not scores" in text(res)


def test_unfinished_or_stale_pruned_folders_are_not_consumed(tmp_path, reference):
    scores = copy_scores(reference, tmp_path)
    pruned = tmp_path / "pruned"
    assert runner.invoke(app, ["prune", str(scores), "--out", str(pruned)]).exit_code == 0
    stats = json.loads((pruned / "stats.json").read_text())
    (pruned / "stats.json").write_text(json.dumps({**stats, "K": 1}, indent=2) + "\n")  # stale stats beside the shards
    for args in (
        ["export", str(pruned), "--format", "jsonl", "--out", str(tmp_path / "e")],
        ["report", str(pruned)],
        ["train", str(pruned), "--out", str(tmp_path / "m")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "stats.json: " in text(res), (args, res.output)
        assert "checksum differs" in text(res) or "the manifest says" in text(res)
    (pruned / io.MANIFEST).unlink()  # as if prune had been killed before its manifest
    for args in (
        ["export", str(pruned), "--format", "jsonl", "--out", str(tmp_path / "e")],
        ["report", str(pruned)],
        ["train", str(pruned), "--out", str(tmp_path / "m")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "unfinished" in text(res), (args, res.output)


def test_a_damaged_manifest_is_one_clear_line(tmp_path, reference, tiny_model_dir):
    scores = copy_scores(reference, tmp_path)
    (scores / io.MANIFEST).write_text('{"stage": "score", "finger')
    res = runner.invoke(app, ["prune", str(scores), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "_manifest.json: not valid JSON" in text(res) and "Traceback" not in res.output
    res = runner.invoke(app, score_args(scores, tiny_model_dir))
    assert res.exit_code == 2 and "not valid JSON" in text(res)
    res = runner.invoke(app, score_args(scores, tiny_model_dir, "--force"))
    assert res.exit_code == 0 and table_rows(scores) == table_rows(reference)


def test_a_folder_in_use_is_refused_and_a_dead_holder_is_taken_over(tmp_path, reference, tiny_model_dir):
    out = tmp_path / "scores"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "since": "now", "command": "curate score other"}
        (out / ".curate.lock").write_text(json.dumps(lock))
        res = runner.invoke(app, score_args(out, tiny_model_dir))
        assert res.exit_code == 2 and f"in use by process {sleeper.pid}" in text(res), res.output
        assert not list(out.glob("part-*"))  # nothing was written beside the other run
    finally:
        sleeper.kill()
        sleeper.wait()
    res = runner.invoke(app, score_args(out, tiny_model_dir))  # its holder is gone now
    assert res.exit_code == 0 and "taking over" in text(res), res.output
    assert not (out / ".curate.lock").exists() and table_rows(out) == table_rows(reference)


def test_two_runs_with_different_settings_never_share_a_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "scores"
    assert runner.invoke(app, score_args(out, tiny_model_dir)).exit_code == 0
    res = runner.invoke(app, score_args(out, tiny_model_dir, "--max-length", "64"))
    assert res.exit_code == 2 and "--force" in text(res)
    (out / io.MANIFEST).unlink()  # even a partial run of other settings is not mixed into
    res = runner.invoke(app, score_args(out, tiny_model_dir, "--max-length", "64"))
    assert res.exit_code == 2 and "other inputs or settings" in text(res)


def test_edges_are_one_line_errors(tmp_path, tiny_model_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = runner.invoke(app, score_args(afile, tiny_model_dir))
    assert res.exit_code == 2 and "afile" in text(res) and "Traceback" not in res.output
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"run_dir: {tmp_path / 'r'}\nscore:\n  input: {DEMO}\n  limit: true\nprune: {{}}\n")
    res = runner.invoke(app, ["run", str(pipeline)])
    assert res.exit_code == 2 and "score.limit: Input should be a valid integer" in text(res)
    res = runner.invoke(app, ["run", str(pipeline), "--set", "score.limit=[", "--set", "x=1"])
    assert res.exit_code == 2 and "--set 'score.limit=[': the value is not valid YAML" in text(res)
    pipeline.write_text("run_dir: [unclosed\n")
    res = runner.invoke(app, ["run", str(pipeline)])
    assert res.exit_code == 2 and "invalid YAML" in text(res)


def mounted_tmpfs(path, options):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
        pytest.skip("needs root and mount (a small tmpfs) to fill a disk or make it read-only")


@pytest.mark.parametrize(
    "kind,options,message",
    [("full", "size=96k", "No space left on device"), ("read-only", "ro,size=1m", "Read-only file system")],
)
def test_a_full_or_read_only_disk_is_one_line(tmp_path, tiny_model_dir, kind, options, message):
    disk = tmp_path / kind
    mounted_tmpfs(disk, options)
    try:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"the fox {i} " * 20},
                    {"role": "assistant", "content": "jumps over the lazy dog " * 30},
                ]
            }
            for i in range(64)
        ]
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        res = runner.invoke(
            app,
            ["score", str(data), "--out", str(disk / "scores"), "--model", str(tiny_model_dir), "--shard-size", "8"],
        )
        assert res.exit_code == 2 and message in text(res) and "Traceback" not in res.output, res.output
        assert "choose another --out" in text(res) or "writable" in text(res)
    finally:
        subprocess.run(["umount", str(disk)])
