"""Data in a bucket: every stage reads and writes s3:// URLs (moto's server on 127.0.0.1) with the guarantees it
has on a local disk: atomic shards, checksums verified, resume after kill -9, one writer per folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from curate import storage
from curate.cli import app
from curate.errors import CurateError

from .conftest import DEMO

runner = CliRunner()


def curate(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def put(local, url: str) -> str:
    fs, path = storage.filesystem(url)
    fs.put_file(str(local), path)
    return url


def objects(url: str) -> dict[str, bytes]:
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def test_score_prune_report_export_in_a_bucket(bucket, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    data = put(DEMO, f"{bucket}/in/demo.jsonl")
    run = f"{bucket}/run"
    common = ["--model", tiny_model_dir, "--limit", 24, "--shard-size", 8, "--dtype", "float32"]
    curate("score", data, "--out", f"{run}/scores", *common)
    curate("score", data, "--out", tmp_path / "local-scores", *common)  # the same input, output on local disk
    remote = objects(f"{run}/scores")
    assert sorted(remote) == [
        ".run.json",
        "_manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert remote[name] == (tmp_path / "local-scores" / name).read_bytes()
    manifest = json.loads(remote["_manifest.json"])
    assert manifest["config"]["out"] == f"{run}/scores" and manifest["inputs"][0]["path"] == data
    assert "testing" not in remote["_manifest.json"].decode()  # credentials never reach a manifest

    curate("prune", f"{run}/scores", "--out", f"{run}/pruned", "--ratio", 0.5)
    curate("report", run)
    curate("export", f"{run}/pruned", "--out", f"{run}/export", "--format", "trl")
    everything = objects(run)
    assert "pruned/_manifest.json" in everything and "report/report.html" in everything
    assert "export/_manifest.json" in everything
    assert json.loads(everything["pruned/_manifest.json"])["inputs"][0]["path"] == f"{run}/scores"
    assert "ok" in curate("verify", run)


def kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `cmd`; SIGKILL it (by its pid) as soon as `ready()` holds, which must come before it finishes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the command finished before the point where it was to be killed"
            assert time.time() < deadline, "the kill point was never reached"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.slow
def test_killed_in_a_bucket_resumes_there_verify_finds_damage_and_a_lost_shard_is_redone(
    bucket, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    data = put(DEMO, f"{bucket}/in/demo.jsonl")
    scores = f"{bucket}/scores"
    args = [data, "--model", tiny_model_dir, "--limit", 120, "--shard-size", 6, "--dtype", "float32"]
    curate("score", *args, "--out", tmp_path / "undisturbed")
    cmd = [sys.executable, "-m", "curate.cli", "score", *map(str, args), "--out", scores]
    kill_when(cmd, lambda: sum(n.startswith("part-") for n in objects(scores)) >= 2)
    left = objects(scores)
    assert "_manifest.json" not in left and ".curate.lock" in left  # uncommitted, and the dead run's lock
    output = curate("score", *args, "--out", scores)
    assert "resuming" in output and "taking over" in output
    after = objects(scores)
    shards = sorted(n for n in after if n.startswith("part-"))
    assert len(shards) == 20 and ".curate.lock" not in after
    for name in shards:  # byte for byte what an undisturbed run wrote on a local disk
        assert after[name] == (tmp_path / "undisturbed" / name).read_bytes()

    fs, root = storage.filesystem(scores)
    damaged = bytearray(after["part-00003.parquet"])
    damaged[len(damaged) // 2] ^= 0xFF
    fs.pipe_file(f"{root}/part-00003.parquet", bytes(damaged))
    result = runner.invoke(app, ["verify", scores])
    assert result.exit_code == 1 and "part-00003.parquet" in result.output and "checksum" in result.output
    refused = runner.invoke(app, ["prune", scores, "--out", f"{bucket}/pruned"])
    assert refused.exit_code == 2 and "part-00003.parquet" in refused.output

    fs.rm_file(f"{root}/part-00007.parquet")
    output = curate("score", *args, "--out", scores)  # both repaired: recomputed, the others kept
    assert "part-00007.parquet: missing; recomputing it" in output and "resuming: 18 of 20" in output
    assert objects(scores)["part-00007.parquet"] == (tmp_path / "undisturbed" / "part-00007.parquet").read_bytes()
    assert "ok" in curate("verify", scores)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock_object(
    bucket, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    out = f"{bucket}/scores"
    with storage.RemoteFolder(out).locked():  # a live holder: this process
        result = runner.invoke(app, ["score", str(DEMO), "--out", out, "--model", str(tiny_model_dir), "--limit", "4"])
        assert result.exit_code == 2 and "is in use by process" in result.output
        with pytest.raises(CurateError, match="in use"), storage.RemoteFolder(out).locked():
            pass
    assert ".curate.lock" not in objects(out)  # released


def test_a_stale_lock_object_of_another_host_is_taken_over(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    folder = storage.RemoteFolder(f"{bucket}/x")
    holder = {"pid": 1, "host": "elsewhere", "heartbeat": time.time() - storage.STALE_S - 1}
    folder.fs.pipe_file(f"{folder.root}/.curate.lock", json.dumps(holder).encode())
    logs = []
    with folder.locked(logs.append):
        assert json.loads(folder.fs.cat_file(f"{folder.root}/.curate.lock"))["host"] != "elsewhere"
    assert any("taking over" in m for m in logs)
    holder["heartbeat"] = time.time()  # alive on another host: refused
    folder.fs.pipe_file(f"{folder.root}/.curate.lock", json.dumps(holder).encode())
    with pytest.raises(CurateError, match="in use by process 1 on elsewhere"), folder.locked():
        pass
