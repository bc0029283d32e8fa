"""A stage is one declaration: the executor does its lifecycle, the registry finds it, the API and the CLI
expose it. And the drifts the hand-written lifecycles had are gone."""

import json

import pytest
from pydantic import Field
from typer.testing import CliRunner

import curate
from curate import io
from curate.config import Options
from curate.executor import Job, runner
from curate.registry import REGISTRY, register
from curate.stage import Input, Manifest, Stage

from .conftest import DEMO, write_jsonl

cli = CliRunner()


class CountConfig(Options):
    data: str = Field(description="A JSONL file.")
    out: str = Field(description="Where counts.json goes.")
    field: str = Field("messages", description="The field to count.")
    threads: int = Field(1, description="Runtime only.", json_schema_extra={"fingerprint": False})


def count(job: Job) -> dict:
    rows = [json.loads(line) for line in job.inputs["data"].read_text().splitlines()]
    n = sum(job.cfg.field in r for r in rows)
    io.write_json_atomic(job.out / "counts.json", {"rows": len(rows), "with_field": n})
    return {"rows": len(rows)}


class CountResult(Manifest):
    rows: int


@pytest.fixture
def toy():
    """The toy stage: one declaration, nothing edited elsewhere."""
    stage = register(
        Stage(
            name="count-rows",
            config=CountConfig,
            compute=count,
            doc="Count rows.",
            inputs=(Input("data", data=True),),
            outputs=("counts.json",),
            result=CountResult,
            summary=lambda m: [f"{m.rows} rows"],
        )
    )
    yield stage
    REGISTRY.pop("count-rows")


def test_a_toy_stage_gets_the_whole_lifecycle_from_one_declaration(tmp_path, toy, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO.read_text().splitlines()[:5])
    result = curate.count_rows(data=data, out=tmp_path / "c")  # the API, from the registry
    assert isinstance(result, CountResult) and result.rows == 5
    manifest = io.verified(tmp_path / "c", "count-rows", "")  # listed with checksums, manifest last
    assert [f["name"] for f in manifest["files"]] == ["counts.json"] and manifest["outputs"] == ["counts.json"]
    assert manifest["inputs"] == [{"path": "../d.jsonl", "fingerprint": io.fingerprint_path(data)}]
    again = runner(toy)(CountConfig(data=str(data), out=str(tmp_path / "c"), threads=4))
    assert again.fingerprint == result.fingerprint  # a runtime field is not part of the fingerprint
    assert curate.count_rows(data=data, out=tmp_path / "c", field="id").fingerprint != result.fingerprint
    monkeypatch.setattr("curate.executor.__version__", "9.9.9")
    assert curate.count_rows(data=data, out=tmp_path / "c").fingerprint != result.fingerprint  # version, always
    with pytest.raises(curate.errors.CurateError, match="is the input folder itself"):
        curate.count_rows(data=data, out=data)
    with pytest.raises(curate.errors.CurateError, match="count_rows\\(\\): 1 problem"):
        curate.count_rows(data=data, out=tmp_path / "c", threads="many")

    from curate.cli import add_stage_command, app

    add_stage_command(toy)
    res = cli.invoke(app, ["count-rows", "--data", str(data), "--out", str(tmp_path / "e")])
    assert res.exit_code == 0 and "5 rows" in res.output


def test_the_api_runs_the_registered_stages_with_the_cli_options(tmp_path, tiny_model_dir):
    scores = curate.score(input=DEMO, out=tmp_path / "s", model=str(tiny_model_dir), limit=12)
    pruned = curate.prune(scores=tmp_path / "s", out=tmp_path / "p", ratio=0.5)
    assert scores.counts["samples"] == 12 and scores.model["hash"] and pruned.stats["K"] == 6
    res = cli.invoke(curate.cli.app, ["prune", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--ratio", "0.5"])
    assert res.exit_code == 0 and "already done" in " ".join(res.output.split())  # the CLI is the same thing


# ---------------------------------------------------------------- the drifts of the hand-written lifecycles


def test_export_fingerprint_includes_the_version(tiny_run, tmp_path, monkeypatch):
    args = ["export", str(tiny_run / "pruned"), "--format", "jsonl", "--out", str(tmp_path / "e")]
    assert cli.invoke(curate.cli.app, args).exit_code == 0
    monkeypatch.setattr("curate.executor.__version__", "9.9.9")
    res = cli.invoke(curate.cli.app, args)
    assert res.exit_code == 0 and "already done" not in res.output


def test_report_refuses_to_write_into_its_input(tiny_run):
    res = cli.invoke(curate.cli.app, ["report", str(tiny_run), "--out", str(tiny_run)])
    assert res.exit_code == 2 and "is the input folder itself" in " ".join(res.output.split())
    assert not (tiny_run / "report.html").exists()


def test_a_refresh_round_trained_by_a_user_command_lists_its_files(tmp_path, tiny_model_dir):
    import sys

    out = tmp_path / "r"
    cmd = f"{sys.executable} -m curate.cli train {{data}} --model {{model}} --out {{out}} --max-steps 1 --lora-rank 0"
    args = ["refresh", str(DEMO), "--out", str(out), "--rounds", "1", "--model", str(tiny_model_dir), "--limit", "8"]
    res = cli.invoke(curate.cli.app, [*args, "--train-cmd", cmd])
    assert res.exit_code == 0, res.output
    manifest = io.verified(out / "round-01" / "model", "model", "")
    assert {"config.json", "model.safetensors"} <= {f["name"] for f in manifest["files"]}
    weights = out / "round-01" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert cli.invoke(curate.cli.app, ["verify", str(out)]).exit_code == 1  # a changed checkpoint is found


def test_a_stray_file_in_a_retokenize_folder_is_found(tiny_run, tmp_path, tiny_model_dir):
    target = tmp_path / "t"
    args = ["retokenize", str(tiny_run / "pruned"), "--model", str(tiny_model_dir), "--out", str(target)]
    res = cli.invoke(curate.cli.app, args)
    assert res.exit_code == 0, res.output
    (target / "data" / "extra.parquet").write_bytes(b"x")
    res = cli.invoke(curate.cli.app, ["verify", str(target)])
    assert res.exit_code == 1 and "stray" in res.output


def test_a_misspelt_option_name_in_a_command_declaration_is_refused():
    from curate.config import ScoreConfig
    from curate.options import command

    with pytest.raises(TypeError, match="no field 'inptu'"):
        command(ScoreConfig, arguments=("inptu",))(lambda cfg: None)


# ---------------------------------------------------------------- a stage with options is one new file

KEEP_FIRST = '''
"""Keep the first N scored samples: a stage, its options and its command in this one file."""

import pyarrow.parquet as pq
from pydantic import Field

from curate import io
from curate.config.base import RUNTIME, Options, PosInt
from curate.registry import register
from curate.stage import Cli, Input, Stage


class KeepFirstConfig(Options):
    scores: str = Field(description="Scores to cut.")
    out: str = Field(description="The first samples' scores.")
    samples: PosInt = Field(8, description="How many samples to keep, the first by shard.")
    chatty: bool = Field(False, description="Say each shard.", json_schema_extra=RUNTIME)


def keep_first(job):
    left = job.cfg.samples
    for entry in job.manifests["scores"].files:
        kept = pq.read_table(job.inputs["scores"] / entry["name"]).slice(0, left)
        left -= kept.num_rows
        if job.cfg.chatty:
            job.log(f"{entry['name']}: {kept.num_rows}")
        source = job.inputs["scores"] / entry["name"]
        io.write_parquet_atomic(kept, job.out / entry["name"], io.parquet_metadata(source))
    return {"counts": {"samples": job.cfg.samples - left}}


STAGE = register(
    Stage(
        name="keep-first",
        produces="scores",
        config=KeepFirstConfig,
        doc="Keep the first scored samples.",
        compute=keep_first,
        inputs=(Input("scores", kind="scores"),),
        outputs=("part-*.parquet",),
        summary=lambda m: [f"kept {m.counts['samples']} samples"],
        cli=Cli(arguments=("scores",)),
    )
)
'''

WITH_STAGE = "import sys, curate.stages; curate.stages.__path__.append(sys.argv[1]); from curate.cli import main; "


@pytest.fixture
def keep_first_file(tmp_path, monkeypatch):
    """The file in a folder of its own that `curate.stages` also reads, as if it had been added to curate/stages/:
    nothing else is written or edited."""
    import sys

    import curate.stages
    from curate import registry

    folder = tmp_path / "more_stages"
    folder.mkdir()
    (folder / "keep_first.py").write_text(KEEP_FIRST)
    monkeypatch.setattr(curate.stages, "__path__", [*curate.stages.__path__, str(folder)])
    yield folder
    registry.REGISTRY.pop("keep-first", None)
    sys.modules.pop("curate.stages.keep_first", None)


def test_a_stage_with_its_options_is_one_new_file(tmp_path, tiny_model_dir, keep_first_file):
    import os
    import subprocess
    import sys

    import yaml

    from curate.cli import app
    from curate.registry import in_order

    scores = curate.score(DEMO, out=tmp_path / "s", model=str(tiny_model_dir), limit=12, shard_size=5)
    assert "keep-first" in [s.name for s in in_order()]  # registered, and placed after score (it reads scores)
    assert [s.name for s in in_order()].index("keep-first") > [s.name for s in in_order()].index("score")

    kept = curate.keep_first(tmp_path / "s", out=tmp_path / "k", samples=7)  # the API
    assert kept.counts["samples"] == 7 and kept.model == scores.model  # scores in, scores out: the contract carried
    again = curate.keep_first(scores=tmp_path / "s", out=tmp_path / "k", samples=7, chatty=True)
    assert again.fingerprint == kept.fingerprint  # a RUNTIME option: the same run

    # the command, with its options from the model, in a fresh process
    command = [sys.executable, "-c", WITH_STAGE + "sys.argv = ['curate', *sys.argv[2:]]; main()", str(keep_first_file)]
    listed = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert "keep-first" in listed.stdout and "Keep the first scored samples." in listed.stdout
    env = {**os.environ, "COLUMNS": "200"}
    own = subprocess.run([*command, "keep-first", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert own.returncode == 0 and "SCORES" in own.stdout
    assert "--samples" in own.stdout and "How many samples to keep" in own.stdout and "--chatty" in own.stdout
    ran = subprocess.run(
        [*command, "keep-first", str(tmp_path / "s"), "--out", str(tmp_path / "c"), "--samples", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0 and "kept 3 samples" in ran.stdout, ran.stderr[-2000:]

    # and a pipeline step, between score and prune, its paths relative to the file
    pipeline = tmp_path / "p.yaml"
    steps = [
        {"score": {"input": str(DEMO), "model": str(tiny_model_dir), "limit": 12, "shard_size": 5}},
        {"keep-first": {"samples": 9}},
        {"prune": {"ratio": 0.5}},
    ]
    pipeline.write_text(yaml.safe_dump({"run_dir": "run", "steps": steps}))
    res = cli.invoke(app, ["run", str(pipeline)])
    assert res.exit_code == 0, res.output
    assert [s["stage"] for s in io.read_manifest(tmp_path / "run")["steps"]] == ["score", "keep-first", "prune"]
    assert io.read_manifest(tmp_path / "run" / "pruned")["stats"]["N"] == 9
