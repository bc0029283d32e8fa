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
