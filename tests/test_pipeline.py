import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_pipeline
from curate.errors import CurateError
from curate.stages.run import stage_configs

from .conftest import DEMO, ROOT, Recorder, write_jsonl

PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_shipped_pipeline_validates_and_documents_its_command(path):
    p = load_pipeline(path)
    assert path.read_text().startswith(f"# curate run pipelines/{path.name}")
    score, prune, train = stage_configs(p)
    assert score.out.endswith("scores") and prune is not None
    assert (train is not None) == (p.train is not None or p.refresh is not None)


def test_all_config_errors_reported_at_once_with_key_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "run_dir": "r",
                "score": {"input": "x", "colour": "red", "max_length": 1},
                "prune": {"ratio": 2, "scope": "everywhere"},
                "extra": 1,
            }
        )
    )
    with pytest.raises(CurateError) as e:
        load_pipeline(bad)
    msg = str(e.value)
    for key in ("score.colour", "score.max_length", "prune.ratio", "prune.scope", "extra"):
        assert key in msg, msg
    assert "5 problem(s)" in msg
    with pytest.raises(CurateError, match="prune.token_ratio"):
        load_pipeline(ROOT / "pipelines" / "demo.yaml", ["prune.token_ratio=0"])


def test_run_pipeline_end_to_end_then_noop(tmp_path, tiny_model_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"the fox {i}"},
                {"role": "assistant", "content": "jumps over " * (1 + i % 5) + str(i)},
            ]
        }
        for i in range(24)
    ]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "score": {"input": str(data), "model": str(tiny_model_dir)},
                "prune": {"ratio": 0.25},
            }
        )
    )
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(cfg), "--set", "prune.token_ratio=0.5"])
    assert res.exit_code == 0, res.output
    assert "EU plane" in res.output and (tmp_path / "run" / "pipeline.yaml").exists()
    kept = pq.read_table(sorted((tmp_path / "run" / "pruned" / "data").glob("*.parquet")))
    assert kept.num_rows == 6
    saved = yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())
    assert saved["prune"]["token_ratio"] == 0.5 and saved["prune"]["lam"] == 0.0
    res = runner.invoke(app, ["run", str(cfg), "--set", "prune.token_ratio=0.5"])
    assert res.exit_code == 0 and res.output.count("nothing to do") == 2, res.output
    res = runner.invoke(app, ["run", str(cfg), "--set", "prune.nope=1"])
    assert res.exit_code == 2 and "prune.nope" in res.output


def test_group_by_keeps_each_sources_share(tmp_path, tiny_model_dir):
    from curate import pruning
    from curate.schema import SAMPLES

    from .conftest import DEMO

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "score": {"input": str(DEMO), "model": str(tiny_model_dir), "limit": 80, "keep_fields": ["source"]},
                "prune": {"ratio": 0.25, "group_by": "source", "group_ratios": {"math": 0.1}},
            }
        )
    )
    res = CliRunner().invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    import polars as pl

    samples = pl.read_parquet(tmp_path / "run" / "pruned" / SAMPLES)
    stats = yaml.safe_load((tmp_path / "run" / "pruned" / "stats.json").read_text())
    assert set(stats["groups"]) == {"math", "copying", "writing", "qa"}
    for group, g in stats["groups"].items():
        n = samples.filter(pl.col("group") == group).height
        assert g["N"] == n and g["K"] == pruning.budget(0.1 if group == "math" else 0.25, n)
    assert "group math: kept" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0 and "<td>math</td>" in (tmp_path / "run" / "report" / "report.html").read_text()
    res = CliRunner().invoke(
        app, ["prune", str(tmp_path / "run" / "scores"), "--out", str(tmp_path / "p2"), "--group-by", "category"]
    )
    assert res.exit_code == 2 and "--keep-fields category" in res.output
    res = CliRunner().invoke(
        app,
        [
            "prune",
            str(tmp_path / "run" / "scores"),
            "--out",
            str(tmp_path / "p3"),
            "--group-by",
            "source",
            "--group-ratios",
            "source=math:0.5,qa:0.2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "p3" / "stats.json").read_text())["groups"]["qa"]["ratio"] == 0.2


@pytest.mark.parametrize(
    "command,choices",
    [
        ("score", ["auto|hf|vllm", "local|ray", "skip|fail", "all|trainable", "exact|topk"]),
        ("prune", ["global|batch", "ppl-low: the lowest", "ifd: IFD", "longest: the most", "rank|minmax", "paper"]),
        ("train", ["linear|cosine"]),
        ("export", ["llamafactory|axolotl|trl|jsonl"]),
        ("refresh", ["auto|hf|vllm"]),
    ],
)
def test_every_help_lists_the_allowed_values_and_bad_ones_stop_before_any_work(tmp_path, command, choices):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())  # help wraps long descriptions
    for c in choices:
        assert c in text, (command, c)
    bad = {
        "score": ["x", "--out", "o", "--backend", "tgi"],
        "prune": ["x", "--out", "o", "--scope", "everywhere"],
        "train": ["x", "--out", "o", "--scheduler", "zigzag"],
        "export": ["x", "--out", "o", "--format", "csv"],
        "refresh": ["x", "--out", "o", "--backend", "tgi"],
    }[command]
    res = CliRunner().invoke(app, [command, *bad])
    assert res.exit_code == 2 and "Invalid value" in res.output and not (tmp_path / "o").exists()


def test_the_demo_runs_with_the_builtin_model(tmp_path, smollm2_dir):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0 and "Demo finished" in res.output, res.output
    assert (tmp_path / "demo" / "report" / "report.html").exists()


def test_demo_recomputes_a_demo_from_other_settings_where_a_pipeline_refuses(tmp_path, tiny_model_dir):
    """The demo's own branch, run with the tiny model: the same pipeline, the same code as `curate demo`."""
    from curate.demo import demo_pipeline
    from curate.stages.run import run_demo

    out = tmp_path / "demo"
    pipeline = demo_pipeline(out).model_copy(deep=True)
    pipeline.score.model, pipeline.score.limit = str(tiny_model_dir), 40
    rec = Recorder()
    run_demo(out, rec, pipeline=pipeline)
    manifest_path = out / "scores" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    fingerprint = manifest["fingerprint"]
    manifest["fingerprint"] = "0" * 16  # as an older q-curate version would have written it
    manifest_path.write_text(json.dumps(manifest))
    res = CliRunner().invoke(app, ["run", str(out / "pipeline.yaml")])  # the same pipeline, not as the demo
    assert res.exit_code == 2 and "other inputs or settings" in res.output  # hours of scoring are never replaced
    run_demo(out, rec, pipeline=pipeline)
    assert any("recomputing it" in line for line in rec.logs)
    assert json.loads(manifest_path.read_text())["fingerprint"] == fingerprint


def test_paths_in_a_pipeline_file_are_relative_to_the_file(tmp_path, tiny_model_dir, monkeypatch):
    """`curate run pipelines/gsm8k.yaml` from another folder: the file's paths are the file's; a missing input
    says where it looked and how to give it."""
    shipped = load_pipeline(ROOT / "pipelines" / "gsm8k.yaml")
    assert shipped.score.input == str(ROOT / "data" / "gsm8k" / "train.jsonl")
    assert shipped.run_dir == str(ROOT / "runs" / "gsm8k")
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    write_jsonl(project / "data" / "rows.jsonl", [json.loads(line) for line in open(DEMO).readlines()[:8]])
    (project / "p.yaml").write_text(
        f"run_dir: runs/x\nscore:\n  input: data/missing.jsonl\n  model: {tiny_model_dir}\nprune:\n  ratio: 0.5\n"
    )
    monkeypatch.chdir(tmp_path)  # not the project's folder
    res = CliRunner().invoke(app, ["run", str(project / "p.yaml")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"{project / 'data' / 'missing.jsonl'} does not exist" in out
    assert "--set score.input=PATH" in out
    res = CliRunner().invoke(app, ["run", "project/p.yaml", "--set", "score.input=project/data/rows.jsonl"])
    assert res.exit_code == 0, res.output
    assert (project / "runs" / "x" / "pruned" / "_manifest.json").exists()  # run_dir: beside the file
