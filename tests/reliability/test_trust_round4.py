"""Trust, round four (#43): each test reproduces, as a user types it, one way q-curate read other data than it was
given, mixed steps' output, or said something other than what it did."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import curate
from curate import io
from curate.cli import app
from curate.config import load_pipeline
from curate.registry import all_stages
from curate.synthetic import synthetic_scores

from ..conftest import DEMO, write_jsonl

PER_TOKEN = {"token_unit": "token", "protect": []}  # synthetic scores have no tokenizer to read text with


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    synthetic_scores(d, 16, mean_tokens=20, shard_size=8)
    return d


def one_line(text: str) -> str:
    return " ".join(text.split())


def demo_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]


def pipeline(path, content: dict):
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


# ---------------------------------------------------------------- 1. a steps pipeline reads the files it names


def test_a_steps_pipeline_run_from_another_folder_reads_the_files_beside_it(tmp_path, tiny_model_dir, monkeypatch):
    """`cd other && curate run ../proj/p.yaml` scored other/data.jsonl (5 rows) instead of the file's own (48)."""
    proj, other = tmp_path / "proj", tmp_path / "other"
    proj.mkdir()
    other.mkdir()
    write_jsonl(proj / "data.jsonl", demo_rows(48))
    write_jsonl(other / "data.jsonl", demo_rows(5))  # the decoy, where the command is typed
    shutil.copytree(tiny_model_dir, proj / "tiny")
    steps = [{"score": {"input": "data.jsonl", "model": "./tiny"}}, {"prune": {"ratio": 0.5}}]
    pipeline(proj / "p.yaml", {"run_dir": "run", "steps": steps})
    monkeypatch.chdir(other)
    res = CliRunner().invoke(app, ["run", "../proj/p.yaml"])
    assert res.exit_code == 0, res.output
    scores = io.read_manifest(proj / "run" / "scores")
    assert scores["counts"]["samples"] == 48
    assert io.recorded_path(proj / "run" / "scores", scores["inputs"][0]["path"]).resolve() == proj / "data.jsonl"
    assert not (other / "run").exists()


def relative_places(stage) -> dict:
    """A stage's options with every path-valued one relative: `./m-FIELD` for a model, `rel/FIELD` otherwise."""
    values: dict = {}
    for field, model in stage.places():
        *parents, last = field.split(".")
        section = values
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = f"./m-{last}" if model else f"rel/{last}"
    return values


def assert_resolved(values: dict, stage, base) -> None:
    for field, model in stage.places():
        *parents, last = field.split(".")
        section = values
        for key in parents:
            section = section[key]
        assert section[last] == str(base / (f"m-{last}" if model else f"rel/{last}")), (stage.name, field)


def test_every_path_of_every_stage_is_relative_to_the_pipeline_file(tmp_path, monkeypatch):
    """One rule for the steps and the sectioned form, from the stages' declarations: each input and the output
    folder of each stage, in a step, in a section of a step and in a section; a model id stays an id."""
    proj = tmp_path / "proj"
    proj.mkdir()
    stages = {name: stage for name, stage in all_stages().items() if name != "run"}
    steps = [{name: relative_places(stage)} for name, stage in stages.items()]
    steps.append({"probe": {"input": "rel/input", "score": relative_places(stages["score"])}, "name": "p2"})
    pipeline(proj / "steps.yaml", {"run_dir": "run", "steps": steps})
    monkeypatch.chdir(tmp_path)  # not the file's folder
    p = load_pipeline(proj / "steps.yaml")
    assert p.run_dir == str(proj / "run")
    for step in p.steps[:-1]:
        ((name, values),) = step.items()
        assert_resolved(values, stages[name], proj)
    assert_resolved(p.steps[-1]["probe"]["score"], stages["score"], proj)

    sections = {
        "score": {"input": "rel/input", "model": "./m-model"},
        "prune": {"exclude_ids": "rel/exclude_ids", "target_model": "./m-target_model"},
        "train": {"model": "org/model"},  # names no folder there: a hub id
    }
    p = load_pipeline(pipeline(proj / "sections.yaml", {"run_dir": "run", **sections}))
    assert (p.score.input, p.score.model) == (str(proj / "rel/input"), str(proj / "m-model"))
    assert (p.prune.exclude_ids, p.prune.target_model) == (str(proj / "rel/exclude_ids"), str(proj / "m-target_model"))
    assert p.train.model == "org/model"


# ---------------------------------------------------------------- 2. every step keeps its own folder


def test_the_same_stage_twice_in_steps_writes_two_folders_and_a_rerun_reuses_both(tmp_path, tiny_model_dir):
    """`steps: [score, prune 0.5, prune 0.25, prune 0.125]` wrote every prune into run/prune, and every rerun
    recomputed; now the first prune keeps `pruned`, the next ones are named by their place or by `name:`."""
    write_jsonl(tmp_path / "data.jsonl", demo_rows(40))
    steps = [
        {"score": {"input": "data.jsonl", "model": str(tiny_model_dir)}},
        {"prune": {"ratio": 0.5}},
        {"prune": {"ratio": 0.25}},
        {"prune": {"ratio": 0.125}, "name": "eighth"},
    ]
    path = pipeline(tmp_path / "p.yaml", {"run_dir": "run", "steps": steps})
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    recorded = [(s["stage"], s["out"]) for s in io.read_manifest(run)["steps"]]
    assert recorded == [("score", "scores"), ("prune", "pruned"), ("prune", "prune-2"), ("prune", "eighth")]
    for folder, kept in (("pruned", 20), ("prune-2", 10), ("eighth", 5)):
        assert io.read_manifest(run / folder)["stats"]["K"] == kept
        assert pq.read_table(run / folder / "samples.parquet").column("kept").to_pylist().count(True) == kept
    again = CliRunner().invoke(app, ["run", str(path)])
    assert again.exit_code == 0 and again.output.count("nothing to do") == 4, again.output

    steps[3]["name"] = "pruned"  # a folder another step writes
    res = CliRunner().invoke(app, ["run", str(pipeline(tmp_path / "p.yaml", {"run_dir": "run", "steps": steps}))])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "steps[3] (prune): its folder pruned is steps[1]'s" in text, res.output
    steps[3]["name"] = "../elsewhere"
    res = CliRunner().invoke(app, ["run", str(pipeline(tmp_path / "p.yaml", {"run_dir": "run", "steps": steps}))])
    assert res.exit_code == 2 and "steps[3]: name '../elsewhere' is not a plain folder name" in res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------- 3. the probe counts only rows it changed


def test_the_probe_counts_only_rows_its_corruption_changed(tmp_path, tiny_model_dir):
    """Answers "positive"/"negative": a swap between two rows with the same answer changed nothing, and was counted
    as noise; so was a corrupted copy of a repeated id, which scoring skips."""
    rows = [
        {
            "id": f"r{i:02d}",
            "messages": [
                {"role": "user", "content": f"Review {i}: the fox jumps over the lazy dog {i} times."},
                {"role": "assistant", "content": "positive" if i % 3 else "negative"},
            ],
        }
        for i in range(40)
    ]
    repeated = [dict(rows[i], messages=[rows[i]["messages"][0], {"role": "assistant", "content": "?"}]) for i in (0, 1)]
    write_jsonl(tmp_path / "data.jsonl", rows + repeated)
    out = tmp_path / "probe"
    args = ["probe", str(tmp_path / "data.jsonl"), "--out", str(out), "--model", str(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--seeds", "0", "--fraction", "0.5", "--random-seeds", "2"])
    assert res.exit_code == 0, res.output
    bad = json.loads((out / "seed-0" / "corrupted.json").read_text())
    written = [json.loads(line) for line in (out / "seed-0" / "corrupted.jsonl").read_text().splitlines()]
    clean = {json.dumps(r["messages"]) for r in rows}
    for row, was in zip(written, rows + repeated):
        changed = json.dumps(row["messages"]) != json.dumps(was["messages"])
        assert changed == (row["id"] in bad and row is written[int(row["id"][1:])]), row["id"]
        if changed:
            assert json.dumps(row["messages"]) not in clean  # another row's own conversation is no corruption
    assert len(bad) >= 15  # the swaps found answers that differ
    result = json.loads((out / "probe.json").read_text())["per_seed"]["0"]
    assert result["corrupted"] == len(bad) and result["corrupted_by_kind"] == {"answer": len(bad)}
    text = " ".join((out / "probe.md").read_text().split())
    assert f"Corrupted samples (changed into a conversation the input does not hold): seed 0: {len(bad)}," in text


# ---------------------------------------------------------------- 4. the summary says what a preset really used


def test_a_preset_with_explicit_options_prints_what_was_used_and_what_it_replaced(tmp_path, scores):
    """`--preset paper --lam 0 --token-order drop-low` pruned with lam 0 and drop-low (the explicit options win),
    and the summary said `--token-order drop-high ... --lam 0.5`; on the command line, in YAML and from Python."""
    given = ["--lam", "0", "--token-order", "drop-low", "--token-unit", "token"]
    res = CliRunner().invoke(app, ["prune", str(scores), "--out", str(tmp_path / "cli"), "--preset", "paper", *given])
    assert res.exit_code == 0, res.output
    text = one_line(res.output)
    assert "preset paper: --token-unit token --protect none --token-order drop-low --token-budget sample" in text
    assert "--lam 0.0 --placement conversation --fill minmax" in text
    assert "(given beside it, in place of the preset's --token-order drop-high --lam 0.5)" in text
    stats = json.loads((tmp_path / "cli" / "stats.json").read_text())
    assert stats["preset"] == {"name": "paper", "replaced": {"token_order": "drop-high", "lam": 0.5}}

    api = curate.prune(scores=scores, out=tmp_path / "api", preset="paper", lam=0.0, **PER_TOKEN)
    assert api.stats["preset"]["replaced"] == {"lam": 0.5}
    steps = [{"prune": {"scores": str(scores), "preset": "paper", "fill": "rank", **PER_TOKEN}}]
    res = CliRunner().invoke(app, ["run", str(pipeline(tmp_path / "p.yaml", {"run_dir": "run", "steps": steps}))])
    assert res.exit_code == 0, res.output
    assert "--fill rank (given beside it, in place of the preset's --fill minmax)" in one_line(res.output)


# ---------------------------------------------------------------- 6. --exclude-ids reads ids exactly


@pytest.fixture(scope="module")
def look_alike_scores(tmp_path_factory, tiny_model_dir):
    """Scores whose ids look alike: `q1`, `q1 ` (a trailing space) and `#7`, among others."""
    d = tmp_path_factory.mktemp("look-alike")
    rows = demo_rows(12)
    for row, id in zip(rows, ["q1", "q1 ", "#7"] + [f"r{i}" for i in range(9)]):
        row["id"] = id
    write_jsonl(d / "data.jsonl", rows)
    args = ["score", str(d / "data.jsonl"), "--out", str(d / "scores"), "--model", str(tiny_model_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return d / "scores"


def test_exclude_ids_are_read_exactly_as_the_explorer_writes_them(tmp_path, look_alike_scores):
    """A line `q1 ` excluded `q1`; a line `#7` excluded nothing and said nothing."""
    listed = tmp_path / "selected-ids.txt"
    listed.write_text("q1 \n#7\n")  # the explorer's download: the ids, one per line, as they are

    def prune(out):
        args = ["prune", str(look_alike_scores), "--out", str(out), "--exclude-ids", str(listed)]
        return CliRunner().invoke(app, args)

    out = tmp_path / "p"
    res = prune(out)
    assert res.exit_code == 0, res.output
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert sorted(s["id"] for s in samples if s["excluded"]) == ["#7", "q1 "]

    listed.write_text("# rejected in review\nq1  \nr1\nnope\n\n")
    res = prune(tmp_path / "p2")
    text = one_line(res.output)
    assert res.exit_code == 2 and "2 of its 3 ids are not in" in text, res.output
    assert "line 2: 'q1  ' (did you mean 'q1'?); line 4: 'nope'" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- 7. the card's picture colours every strategy


@pytest.mark.parametrize("strategy", ["longest", "random", "ppl-high"])
def test_the_cards_picture_colours_what_a_baseline_kept_and_names_it(tmp_path, scores, strategy):
    """`--strategy longest`: no coloured pixel in the card's plane, under a caption that says grey is dropped."""
    import io as bytes_io

    import numpy as np
    from PIL import Image

    from curate.card import OTHER

    out = tmp_path / "p"
    args = ["prune", str(scores), "--out", str(out), "--strategy", strategy, "--ratio", "0.5"]
    res = CliRunner().invoke(app, [*args, "--token-unit", "token", "--protect", "none"])
    assert res.exit_code == 0, res.output
    pixels = np.asarray(Image.open(bytes_io.BytesIO((out / "eu_plane.png").read_bytes())).convert("RGB"))
    assert (pixels.reshape(-1, 3) == OTHER).all(axis=1).sum() >= 8 * 9 // 2  # 8 kept samples, 3x3 dots, overlapping
    card = (out / "README.md").read_text()
    assert f"grey samples were dropped, green ones kept by `{strategy}` (" in card and "red ones" not in card


# ---------------------------------------------------------------- 8, 9. one clear line, never a traceback


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_storage_options_from_a_file_not_in_utf8_are_one_line_without_the_secret(tmp_path, monkeypatch, encoding):
    from curate import storage

    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"s3": {"key": "me", "secret": "Geheimnis-é"}}, ensure_ascii=False), encoding=encoding)
    res = CliRunner().invoke(app, ["--storage-options", f"@{creds}", "verify", str(tmp_path)])
    assert res.exit_code == 2, res.output  # a traceback would be exit code 1
    assert f"{creds} is not UTF-8 text (byte " in one_line(res.output) and "save the JSON as UTF-8" in res.output
    assert "Geheimnis" not in res.output and "G\x00e" not in res.output


def test_a_symbolic_link_loop_as_out_is_named(tmp_path, scores, monkeypatch):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for out in (tmp_path / "a", tmp_path / "a" / "pruned"):
        res = CliRunner().invoke(app, ["prune", str(scores), "--out", str(out), "--token-unit", "token"])
        assert res.exit_code == 2, res.output  # a traceback would be exit code 1
        assert f"{out}: a symbolic link loop" in one_line(res.output)
    monkeypatch.chdir(tmp_path)
    steps = [{"prune": {"scores": str(scores), **PER_TOKEN}}]
    res = CliRunner().invoke(app, ["run", str(pipeline(tmp_path / "p.yaml", {"run_dir": "a", "steps": steps}))])
    assert res.exit_code == 2 and f"{tmp_path / 'a'}: a symbolic link loop" in one_line(res.output), res.output


# ---------------------------------------------------------------- also seen


def test_a_pipelines_refusal_names_its_run_dir_not_an_out_it_has_not(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", demo_rows(16))
    sections = {"score": {"input": "data.jsonl", "model": str(tiny_model_dir)}, "prune": {"ratio": 0.5}}
    path = pipeline(tmp_path / "p.yaml", {"run_dir": "run", **sections})
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    res = CliRunner().invoke(app, ["run", str(path), "--set", "score.max_length=64"])
    text = one_line(res.output)
    assert res.exit_code == 2 and "holds score output from other inputs or settings" in text, res.output
    assert "use --force to replace it or choose another run_dir" in text and "--out" not in text


def test_prune_refuses_to_replace_a_folder_of_other_settings_without_force(tmp_path, scores):
    """Pruning into another run's folder with other settings replaced it, silently: a model may have been trained
    on it. As for scores, --force replaces it."""
    out = tmp_path / "p"

    def prune(*more):
        args = ["prune", str(scores), "--out", str(out), "--token-unit", "token", "--protect", "none"]
        return CliRunner().invoke(app, [*args, *more])

    assert prune("--ratio", "0.25").exit_code == 0
    res = prune("--ratio", "0.5")
    text = one_line(res.output)
    assert res.exit_code == 2 and f"{out} holds prune output from other inputs or settings; use --force" in text
    assert io.read_manifest(out)["stats"]["K"] == 4 and not io.file_problems(out, io.read_manifest(out))
    assert prune("--ratio", "0.5", "--force").exit_code == 0 and io.read_manifest(out)["stats"]["K"] == 8


def test_the_probe_refuses_to_write_beside_a_users_file(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", demo_rows(20))
    (tmp_path / "out" / "seed-0").mkdir(parents=True)
    (tmp_path / "out" / "seed-0" / "notes.txt").write_text("mine")
    args = ["probe", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    res = CliRunner().invoke(app, [*args, "--seeds", "0", "--random-seeds", "2"])
    text = one_line(res.output)
    assert res.exit_code == 2 and "seed-0/notes.txt was not written by `curate probe`" in text, res.output
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["notes.txt", "seed-0"]  # nothing written


def test_the_python_api_takes_each_stages_main_input_positionally(tmp_path, tiny_model_dir, scores):
    """`curate.score("data.jsonl", out=...)`, as on the command line: "takes 0 positional arguments"."""
    write_jsonl(tmp_path / "data.jsonl", demo_rows(8))
    scored = curate.score(tmp_path / "data.jsonl", out=tmp_path / "scores", model=str(tiny_model_dir))
    assert scored.counts["samples"] == 8
    pruned = curate.prune(scores, out=tmp_path / "p", ratio=0.5, **PER_TOKEN)
    assert pruned.stats["K"] == 8
    with pytest.raises(TypeError, match=r"curate.prune\(\) takes scores positionally; give the other options by"):
        curate.prune(scores, tmp_path / "p")
    with pytest.raises(TypeError, match="got scores both positionally and by keyword"):
        curate.prune(scores, scores=scores, out=tmp_path / "p")
    with pytest.raises(TypeError, match=r"curate.run\(\) takes no positional argument"):
        curate.run(tmp_path / "p.yaml")


def test_a_train_step_trains_on_the_pruned_folder_before_it(tmp_path):
    """A stage that takes one of several kinds (train: pruned data, or scores with --dynamic) is wired to the first
    of them that an earlier step wrote."""
    from curate.stages.run import step_configs

    steps = [{"score": {"input": "d.jsonl"}}, {"prune": {}}, {"train": {"max_steps": 1}}]
    p = load_pipeline(pipeline(tmp_path / "p.yaml", {"run_dir": "run", "steps": steps}))
    (_, score), (_, prune), (_, train) = step_configs(p)
    assert prune.scores == score.out and train.data == prune.out == str(tmp_path / "run" / "pruned")
