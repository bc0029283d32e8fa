"""The house's rules, by stages registered here and nowhere else: a stage inserted between score and prune in a
pipeline file is found by the kind it produces, and a sharded stage resumes after kill -9 at the shard it was on,
on the local and the Ray engine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import Field
from typer.testing import CliRunner

from curate import io, kinds
from curate.cli import app
from curate.config import Options
from curate.errors import CurateError
from curate.executor import Job, execute
from curate.registry import REGISTRY, register
from curate.stage import Input, Manifest, Stage

from .conftest import DEMO, ROOT, kill_when


class DropShortConfig(Options):
    scores: str = Field(description="Scores to filter.")
    out: str = Field(description="The filtered scores.")
    min_trainable: int = Field(4, description="Keep samples with at least this many trainable tokens.")


def drop_short(job: Job) -> dict:
    """Scores in, scores out: the samples with enough trainable tokens, shard by shard. What scores carry (the model,
    the signals...) it neither lists nor copies: declaring the kind it produces carries the contract."""
    kept = 0
    for entry in job.manifests["scores"].files:
        table = pq.read_table(job.inputs["scores"] / entry["name"])
        keep = [n >= job.cfg.min_trainable for n in table.column("n_trainable").to_pylist()]
        filtered = table.filter(pa.array(keep))
        kept += filtered.num_rows
        meta = io.parquet_metadata(job.inputs["scores"] / entry["name"])
        io.write_parquet_atomic(filtered, job.out / entry["name"], meta)
    return {"counts": {"samples": kept}}


@pytest.fixture
def drop_short_stage():
    stage = register(
        Stage(
            name="drop-short",
            produces="scores",
            config=DropShortConfig,
            compute=drop_short,
            inputs=(Input("scores", kind="scores"),),
            outputs=("part-*.parquet",),
            result=Manifest,
        )
    )
    yield stage
    REGISTRY.pop("drop-short")


def test_a_stage_between_score_and_prune_in_a_pipeline_file(tmp_path, tiny_model_dir, drop_short_stage):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "run_dir": "run",
                "steps": [
                    {"score": {"input": str(DEMO), "model": str(tiny_model_dir), "limit": 40, "shard_size": 16}},
                    {"drop-short": {"min_trainable": 12}},
                    {"prune": {"ratio": 0.5}},
                ],
            }
        )
    )
    res = CliRunner().invoke(app, ["run", str(pipeline)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    manifest = io.read_manifest(run)
    assert [(s["stage"], s["kind"], s["out"]) for s in manifest["steps"]] == [
        ("score", "scores", "scores"),
        ("drop-short", "scores", "drop-short"),
        ("prune", "pruned", "pruned"),
    ]
    pruned = io.read_manifest(run / "pruned")
    assert pruned["inputs"][0]["path"] == "../drop-short" and pruned["inputs"][0]["kind"] == "scores"
    scored, filtered = io.read_manifest(run / "scores"), io.read_manifest(run / "drop-short")
    assert all(filtered[k] == scored[k] for k in kinds.fields("scores"))  # the contract, carried
    short = [n for n in pq.read_table(run / "scores").column("n_trainable").to_pylist() if n < 12]
    samples = pq.read_table(run / "pruned" / "samples.parquet").num_rows
    assert short and samples == 40 - len(short)  # pruned from the filtered scores
    assert CliRunner().invoke(app, ["verify", str(run)]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0  # the run's parts found by kind
    again = CliRunner().invoke(app, ["run", str(pipeline)])
    assert again.exit_code == 0 and again.output.count("nothing to do") == 3


class Tally(Manifest):
    """A toy kind's contract: every tally carries its total."""

    total: int


class TallyConfig(Options):
    out: str = Field(description="out")
    total: int | str | None = Field(None, description="the total to give (of any type), or none")


class ReadConfig(Options):
    tally: str = Field(description="a tally")
    out: str = Field(description="out")


@pytest.fixture
def tally_stages():
    kinds.register("tally", Tally)
    produce = register(
        Stage(
            name="toy-tally",
            produces="tally",
            config=TallyConfig,
            compute=lambda job: {} if job.cfg.total is None else {"total": job.cfg.total},
        )
    )
    seen = []
    consume = register(
        Stage(
            name="toy-read",
            config=ReadConfig,
            compute=lambda job: seen.append(job.manifests["tally"]) or {},
            inputs=(Input("tally", kind="tally"),),
        )
    )
    yield produce, consume, seen
    REGISTRY.pop("toy-tally"), REGISTRY.pop("toy-read"), kinds.CONTRACTS.pop("tally")


def test_a_kind_contract_is_checked_where_it_is_produced_and_handed_typed_to_its_consumer(tmp_path, tally_stages):
    produce, consume, seen = tally_stages
    with pytest.raises(CurateError, match=r"produces tally, whose manifest carries total; it gave: total \(missing\)"):
        execute(produce, TallyConfig(out=str(tmp_path / "none")))
    assert not (tmp_path / "none" / io.MANIFEST).exists()  # refused: no manifest says it is finished
    with pytest.raises(CurateError, match=r"total \(not int\)"):
        execute(produce, TallyConfig(out=str(tmp_path / "bad"), total="many"))
    execute(produce, TallyConfig(out=str(tmp_path / "t"), total=3))
    execute(consume, ReadConfig(tally=str(tmp_path / "t"), out=str(tmp_path / "r")))
    assert isinstance(seen[0], Tally) and seen[0].total == 3


def test_the_parts_of_a_run_are_read_as_their_kinds_contracts(tiny_run, tmp_path):
    """A run found from any folder (`runs.locate`: the report, the explorer, inspect) is typed as its kinds'
    contracts: the report reads what scores carry (their duplicates) as fields, and scores from before a field
    existed read as what the contract says leaving it out meant (no duplicates counted), never a default of the
    reader's."""
    import shutil

    from curate import runs

    found = runs.locate(tiny_run)
    assert isinstance(found.scores_manifest, kinds.Scores) and isinstance(found.pruned_manifest, kinds.Pruned)
    assert found.scores_manifest.duplicates == io.read_manifest(tiny_run / "scores")["duplicates"]
    older = tmp_path / "older"
    shutil.copytree(tiny_run, older)
    manifest = io.read_json(older / "scores" / io.MANIFEST)
    del manifest["duplicates"]
    io.write_json_atomic(older / "scores" / io.MANIFEST, manifest)
    assert runs.locate(older).scores_manifest.duplicates["groups"] == 0
    res = CliRunner().invoke(app, ["report", str(older)])
    assert res.exit_code == 0, res.output
    assert 'id="duplicates"' not in (older / "report" / "report.html").read_text()


# A sharded stage declared inside the process that runs it (the script below): 6 shards, each a file written after a
# pause, each run of a shard appended to a log. Killed after two shards, the same command again runs only the rest:
# the stage says nothing of completion, the executor's mark in each file does.
TOY = textwrap.dedent(
    """
    import sys, time
    from dataclasses import dataclass
    import pyarrow as pa
    from pydantic import Field
    from curate import io
    from curate.config import Options
    from curate.executor import execute
    from curate.registry import register
    from curate.stage import Manifest, Resources, Shards, Stage, Worker

    class ToyConfig(Options):
        out: str = Field(description="out")
        engine: str = Field("local", description="local or ray", json_schema_extra={"fingerprint": False})
        address: str | None = Field(None, description="ray", json_schema_extra={"fingerprint": False})

    @dataclass(frozen=True)
    class Part:
        index: int

    class Toy(Worker):
        def __init__(self, work, output, gpus):
            self.output = output

        def run(self, part, progress):
            time.sleep(0.5)
            with open(self.output.folder / "ran.log", "a") as f:
                f.write(f"{part.index}\\n")
            self.output.write_parquet(f"part-{part.index}.parquet", pa.table({"index": [part.index]}), {})
            progress(1)
            return {"index": part.index}

    def reduce(job, parts, results, info):
        return {"ran_now": sorted(results), "engine": info["engine"]}

    stage = register(Stage(
        name="toy-shards", config=ToyConfig, outputs=("part-*.parquet", "ran.log"), resumable=True, result=Manifest,
        shards=Shards(
            plan=lambda job: [Part(i) for i in range(6)],
            output=lambda part: f"part-{part.index}.parquet",
            work=lambda job: None,
            worker=Toy,
            reduce=reduce,
            resources=lambda cfg: Resources(engine=cfg.engine, address=cfg.address),
        ),
    ))
    out, engine, address = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    execute(stage, ToyConfig(out=out, engine=engine, address=address))
    print("done")
    """
)


def run_toy(tmp_path, engine: str, address: str | None = None):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    out = tmp_path / f"toy-{engine}"
    command = [sys.executable, str(script), str(out), engine, *([address] if address else [])]
    kill_when(command, lambda: len(list(out.glob("part-*.parquet"))) >= 2)  # kill -9, two shards in
    finished = {p.name for p in out.glob("part-*.parquet")}
    assert 2 <= len(finished) < 6 and not (out / io.MANIFEST).exists()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = io.read_manifest(out)
    assert sorted(f["name"] for f in manifest["files"]) == [*(f"part-{i}.parquet" for i in range(6)), "ran.log"]
    assert manifest["engine"] == engine
    # the second attempt ran exactly the shards the first did not finish, each once
    left = {f"part-{i}.parquet" for i in range(6)} - finished
    assert manifest["ran_now"] == sorted(int(n.split("-")[1].split(".")[0]) for n in left)
    ran = [int(x) for x in (out / "ran.log").read_text().split()]
    assert sorted(set(ran)) == list(range(6)) and len(ran) <= 7  # the shard in flight at the kill, at most, twice


@pytest.mark.slow
def test_a_sharded_stage_resumes_after_kill_9_at_its_shard_on_the_local_engine(tmp_path):
    run_toy(tmp_path, "local")


def test_a_sharded_stage_resumes_after_kill_9_at_its_shard_on_ray(tmp_path, local_ray):
    import ray

    run_toy(tmp_path, "ray", ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray cluster this test starts (and stops): the toy's driver joins it, so killing the driver kills no process
    the test did not start."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_house_has_no_hand_written_lifecycle():
    """`locked(` and `write_manifest(` are the executor's and storage's, and the synthetic data's and push's."""
    found = subprocess.run(
        ["grep", "-rln", "-e", "locked(", "-e", "write_manifest(", "curate", "--include=*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(found) == [
        "curate/executor.py",
        "curate/io.py",
        "curate/publish.py",
        "curate/storage.py",
        "curate/synthetic.py",
    ]
