"""Data in a bucket: every stage reads and writes s3:// URLs (moto's server on 127.0.0.1) with the guarantees it
has on a local disk: atomic shards, checksums verified, resume after kill -9, one writer per folder."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import storage
from curate.cli import app
from curate.errors import CurateError

from .conftest import DEMO, kill_when

runner = CliRunner()


def curate(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def put(local, url: str) -> str:
    fs, path = storage.filesystem(url)
    fs.put_file(str(local), path)
    return url


def names(url: str) -> list[str]:
    """The objects under a folder URL (what a poll may look at while a run writes there)."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    return [p[len(path) + 1 :] for p in fs.find(path)]


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
    some_id = pq.read_table(pa.BufferReader(everything["pruned/samples.parquet"])).column("id")[0].as_py()
    assert some_id in curate("inspect", run, "--id", some_id)  # the run read from the bucket, as a user names it


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
    kill_when(cmd, lambda: sum(n.startswith("part-") for n in names(scores)) >= 2)
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


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_workers_read_from_and_write_to_the_bucket_and_nothing_else_to_local_disk(
    bucket, tiny_model_dir, tmp_path, monkeypatch
):
    import ray

    from curate.config import ScoreConfig
    from curate.stages import score

    model = f"{bucket}/models/tiny"
    fs, root = storage.filesystem(model)
    fs.put(str(tiny_model_dir), root, recursive=True)  # no node needs a local model folder
    data = put(DEMO, f"{bucket}/in/demo.jsonl")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    # the workers keep their working copies in another cache, as on other machines: the driver must not need them
    workers_cache = {"env_vars": {"CURATE_CACHE": str(tmp_path / "workers-cache")}}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
        runtime_env=workers_cache,
    )
    try:
        cfg = dict(input=data, limit=32, shard_size=8, dtype="float32")
        manifest = score.run(ScoreConfig(out=f"{bucket}/scores", model=model, engine="ray", workers=2, **cfg))
    finally:
        ray.shutdown()
    assert manifest["scoring"]["workers"] == 2 and manifest["model"]["name"] == model
    assert "shard_summaries" not in manifest["scoring"]
    # the driver read only what the workers reported: no shard in its working copy, the bucket has them all
    assert not list(storage.staging_dir(f"{bucket}/scores").glob("part-*")), "the driver downloaded shards"
    assert len(list((tmp_path / "workers-cache" / "staging").glob("*-scores/part-*.parquet"))) == 4
    assert "ok" in curate("verify", f"{bucket}/scores")  # the entries the workers reported are the objects
    local = score.run(ScoreConfig(out=str(tmp_path / "local"), model=str(tiny_model_dir), **cfg))
    assert manifest["model"]["hash"] == local["model"]["hash"]  # the fetched model is the same, by content
    remote = objects(f"{bucket}/scores")
    for name in (f["name"] for f in local["files"]):  # the same rows and scores (metadata names the model's URL)
        ours = pq.read_table(pa.BufferReader(remote[name])).to_pylist()
        theirs = pq.read_table(tmp_path / "local" / name).to_pylist()
        assert [r["id"] for r in ours] == [r["id"] for r in theirs]
        for a, b in zip(ours, theirs):
            assert a["input_ids"] == b["input_ids"]
            assert np.allclose(a["logprob"], b["logprob"], atol=1e-6, equal_nan=True)
    assert not any(work.iterdir())  # the run wrote nothing to local disk but its caches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "local", "work", "workers-cache"]


def test_a_model_url_is_fetched_once_and_checked_by_content_hash(bucket, tiny_model_dir, tmp_path, monkeypatch):
    from curate.models import model_on_this_node, resolve_model

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    url = f"{bucket}/models/tiny"
    fs, root = storage.filesystem(url)
    fs.put(str(tiny_model_dir), root, recursive=True)
    model = resolve_model(url)
    assert model.hash == resolve_model(str(tiny_model_dir)).hash and model.name == url
    # a node without the driver's copy fetches its own, and the run's hash must match it
    assert model_on_this_node(url, str(tmp_path / "not-on-this-node"), model.hash) == model.path
    fs.pipe_file(f"{root}/config.json", b'{"changed": true}')
    with pytest.raises(CurateError, match="changed since this run started"):
        model_on_this_node(url, str(tmp_path / "not-on-this-node"), model.hash)


def hub_layout(root, rows: list[dict], licence: str = "mit"):
    """A folder laid out as a Hub dataset repo: a card whose configs name two subsets, train in two files."""
    root.mkdir(parents=True)
    (root / "README.md").write_text(
        f"""---
license: {licence}
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test-*.parquet
- config_name: other
  data_files: other/*.parquet
---
# a dataset
"""
    )
    (root / "main").mkdir()
    (root / "other").mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 10), root / "main" / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(10, 6), root / "main" / "train-00001-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(16, 5), root / "main" / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(21, 3), root / "other" / "all.parquet")
    return root


def demo_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]


def test_a_hub_layout_dataset_is_read_by_subset_and_split_and_its_licence_reaches_the_card(
    bucket, tiny_model_dir, tmp_path, monkeypatch
):
    import datasets

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    rows = demo_rows(24)
    local = hub_layout(tmp_path / "hub" / "datasets" / "org" / "sft", rows)
    url = f"{bucket}/datasets/org/sft"  # the same repo in a bucket: the same code reads both
    fs, root = storage.filesystem(url)
    fs.put(str(local), root, recursive=True)
    for given in (f"file://{local}", url):
        out = tmp_path / "scores" / given.split(":")[0]
        curate(
            "score",
            given,
            "--split",
            "train",
            "--subset",
            "main",
            "--out",
            out,
            "--model",
            tiny_model_dir,
            "--shard-size",
            4,
            "--dtype",
            "float32",
        )
        manifest = json.loads((out / "_manifest.json").read_text())
        assert [f.rsplit("/", 1)[1] for f in manifest["source"]["files"]] == [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet",
        ]
        assert manifest["counts"]["rows_read"] == 16  # the train split only, both files
        assert len(manifest["files"]) == 3 + 2  # shards never span files: 10 rows -> 3, 6 rows -> 2
        ids = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["id"]).column("id").to_pylist()
        assert ids == [str(r.get("id")) for r in rows[:16]] or len(set(ids)) == 16
    other = runner.invoke(
        app, ["score", str(local), "--subset", "nope", "--out", str(tmp_path / "x"), "--model", str(tiny_model_dir)]
    )
    assert other.exit_code == 2 and "no subset 'nope'" in other.output and "main, other" in other.output

    pruned = f"{bucket}/pruned"
    curate("prune", tmp_path / "scores" / "s3", "--out", pruned, "--ratio", 0.5)
    card = objects(pruned)["README.md"].decode()
    assert "license: mit" in card
    copy = tmp_path / "pushed"
    curate("push", pruned, copy)
    ds = datasets.load_dataset(str(copy), split="train")  # the card's config: the training data only
    assert len(ds) == json.loads(objects(pruned)["stats.json"])["K"]
    assert {"input_ids", "labels", "loss_mask"} <= set(ds.column_names)


def test_push_to_a_bucket_and_to_the_hub(bucket, tiny_run, tmp_path, monkeypatch):
    import base64

    import httpx2
    import huggingface_hub

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    pruned = tiny_run / "pruned"
    listed = [f["name"] for f in json.loads((pruned / "_manifest.json").read_text())["files"]]
    curate("push", pruned, f"{bucket}/published")
    assert sorted(objects(f"{bucket}/published")) == sorted([*listed, "_manifest.json"])
    assert "ok" in curate("verify", f"{bucket}/published")

    # The Hub: its client's own HTTP seam (huggingface_hub.set_client_factory) answers as the Hub does; the
    # commit it receives is checked file by file against the folder.
    requests = []

    def hub(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(
                200, json={"url": "https://huggingface.co/datasets/org/pruned", "name": "org/pruned"}
            )
        if path == "/api/validate-yaml":  # the Hub checks a card's YAML header before the commit
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/tree/" in path:  # the repo's files: one data shard left by an earlier push, and its card
            return httpx2.Response(
                200,
                json=[
                    {"type": "file", "path": "data/train-00000-of-00009.parquet", "oid": "1", "size": 1},
                    {"type": "file", "path": "README.md", "oid": "2", "size": 1},
                ],
            )
        if "/commit/" in path:
            return httpx2.Response(
                200,
                json={
                    "commitUrl": "https://huggingface.co/datasets/org/pruned/commit/abc",
                    "commitOid": "abc" * 13 + "a",
                    "pullRequestUrl": None,
                },
            )
        return httpx2.Response(404, json={"error": f"not answered here: {request.method} {path}"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    try:
        output = curate("push", pruned, "hf://datasets/org/pruned")
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    assert "https://huggingface.co/datasets/org/pruned/commit/abc" in output
    commit = next(r for r in requests if "/commit/" in r.url.path)
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    uploaded = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
    assert sorted(uploaded) == sorted([*listed, "_manifest.json"])
    deleted = [x["value"]["path"] for x in lines if x["key"] == "deletedFile"]
    assert deleted == ["data/train-00000-of-00009.parquet"]  # the stale shard goes, the card is replaced
    for name, content in uploaded.items():
        assert content == (pruned / name).read_bytes()


def test_a_shard_reads_only_its_own_byte_ranges_of_a_remote_file(bucket, tmp_path, monkeypatch):
    """A worker's shard fetches a fraction of a remote Parquet (its row groups) or JSONL file (its lines): what was
    fetched is counted at s3fs's one ranged-read call, which still does the reading."""
    import s3fs

    from curate import readers

    fetched = []
    real = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        fetched.append(end - start)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    monkeypatch.setattr(storage, "READ_BLOCK", 1 << 16)
    rng = np.random.default_rng(0)
    rows = [{"id": str(i), "text": "".join(rng.choice(list("abcdefgh"), 2000))} for i in range(800)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=100, compression="none")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.parquet", "d.jsonl"):
        url = put(tmp_path / name, f"{bucket}/{name}")
        shards = readers.plan(url, 100)
        fetched.clear()
        got = [record for _, record in readers.read_range(url, shards[6])]
        assert got == rows[600:700]
        size = (tmp_path / name).stat().st_size
        assert sum(fetched) < 0.3 * size, (name, sum(fetched), size)  # one eighth of the rows, and some framing


def test_storage_options_reach_the_store_and_no_manifest_or_log(bucket, s3_server, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(storage.OPTIONS_ENV, "")  # restored after the test: the CLI sets it for its run
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = {"s3": {"endpoint_url": s3_server["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}}
    output = curate("--storage-options", json.dumps(options), "push", tiny_run / "pruned", f"{bucket}/via-options")
    assert "testing" not in output
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps(options))
    pushed = objects(f"{bucket}/via-options")
    assert "_manifest.json" in pushed and all(b"testing" not in content for content in pushed.values())
