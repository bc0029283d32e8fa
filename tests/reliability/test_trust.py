"""Trust, round two: what a hostile or careless user can do that must not silently reuse or lose data."""

import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from curate.cli import app
from curate.config import ScoreConfig
from curate.stages import score

from ..conftest import DEMO, Recorder, build_tiny_model_dir, write_jsonl

runner = CliRunner()


def test_a_model_retrained_in_place_is_noticed(tmp_path):
    """Same file names and sizes, new weights: the rerun scores again instead of saying `already done`."""
    model = build_tiny_model_dir(tmp_path / "model")
    cfg = ScoreConfig(input=str(DEMO), out=str(tmp_path / "s"), model=str(model), limit=6)
    first = score.run(cfg)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("lm_head.weight"))
    tensors[name] = tensors[name] * 0.5  # "retrained": other values, same shapes, so the same file size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    rec = Recorder()
    with pytest.raises(Exception, match="--force"):  # scores of other weights are never reused (nor replaced silently)
        score.run(cfg, rec)
    second = score.run(cfg, force=True)
    assert second["model"]["hash"] != first["model"]["hash"]
    assert second["fingerprint"] != first["fingerprint"]


def test_model_hash_is_cached_by_file_state(tmp_path, tiny_model_dir):
    from curate.models import _folder_hash

    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    assert _folder_hash(copy) == _folder_hash(tiny_model_dir)  # contents, not paths
    (copy / "extra.bin").write_bytes(b"x")
    assert _folder_hash(copy) != _folder_hash(tiny_model_dir)


@pytest.mark.parametrize("command", [["prune", "SCORES", "--out", "OUT"], ["train", "DATA", "--out", "OUT"]])
def test_a_negative_seed_is_an_option_error(tmp_path, command):
    args = [
        a.replace("SCORES", str(tmp_path)).replace("DATA", str(tmp_path)).replace("OUT", str(tmp_path / "o"))
        for a in command
    ]
    res = runner.invoke(app, [*args, "--seed", "-1"])
    assert res.exit_code == 2 and "--seed: Input should be greater than or equal to 0" in " ".join(res.output.split())


@pytest.mark.parametrize("field", ["id", "n_tokens", "truncated", "logprob"])
def test_keep_fields_that_are_built_in_columns_are_refused_up_front(tmp_path, field):
    res = runner.invoke(app, ["score", str(DEMO), "--out", str(tmp_path / "s"), "--keep-fields", f"source,{field}"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"{field!r} is a column q-curate writes" in out
    assert not (tmp_path / "s").exists()  # refused before any work


def test_export_quotes_paths_in_the_code_and_configs_it_writes(tiny_run, tmp_path):
    """A quote, ` #` and a newline in --out must neither inject code nor cut a path."""
    import ast

    import yaml

    out = tmp_path / 'we"ird #dir\nx'
    for fmt, name in (("trl", "train_trl.py"), ("jsonl", "load.py"), ("axolotl", "axolotl.yaml")):
        dest = out / fmt
        res = runner.invoke(app, ["export", str(tiny_run / "pruned"), "--format", fmt, "--out", str(dest)])
        assert res.exit_code == 0, res.output
        text = (dest / name).read_text()
        if name.endswith(".py"):
            strings = [n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant)]
            assert str(dest / "data" / "*.parquet") in strings or str(dest / "data.jsonl") in strings
        else:
            assert yaml.safe_load(text)["datasets"][0]["path"] == str(dest / "data.jsonl")


def test_markup_and_control_characters_from_users_are_text(tmp_path, tiny_model_dir):
    """`[/x]` in --out and ids that spell markup or terminal escapes: no crash after the work, nothing raw shown."""
    import json

    rows = [
        {"id": i, "messages": [{"role": "user", "content": f"q {n}"}, {"role": "assistant", "content": f"a {n} b"}]}
        for n, i in enumerate(["a[/]0", "b\x1b[31mred", "c[bold]x", "d", "e", "f"])
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores, pruned = tmp_path / "s[/x]", tmp_path / "p[/x]"
    res = runner.invoke(app, ["score", str(data), "--out", str(scores), "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prune", str(scores), "--out", str(pruned), "--ratio", "1"])
    assert res.exit_code == 0, res.output
    assert f"pruned data: {pruned}" in " ".join(res.output.split()) or str(pruned) in res.output
    for sid in ("a[/]0", "b\x1b[31mred"):
        res = runner.invoke(app, ["inspect", str(pruned), "--id", sid])
        assert res.exit_code == 0, res.output
        assert "\x1b" not in res.output and repr(sid)[1:-1][:3] in res.output


TOOLS_TEMPLATE = (  # Qwen2.5-like: the schemas given as `tools=` are written into the system turn
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if not (tools and loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, None])
def test_a_sharegpt_system_prompt_survives_tools_which_reach_the_template(tmp_path, template):
    """Both the system prompt and the tools are kept; a template that renders tools gets them as `tools=` (the
    prompt the model sees at inference), others as system text; the manifest says which."""
    import json

    from curate.formats import Sample, to_sample
    from curate.tokenization import ChatEncoder

    from ..conftest import CHATML, build_tiny_tokenizer

    record = {
        "system": "You are a careful travel agent.",
        "tools": '[{"name": "book", "parameters": {}}]',
        "conversations": [{"from": "human", "value": "book it"}, {"from": "gpt", "value": "Done."}],
    }
    sample = to_sample(0, record, "sharegpt", {})
    assert isinstance(sample, Sample)
    assert [m["role"] for m in sample.messages] == ["tools", "system", "user", "assistant"]
    tok = build_tiny_tokenizer(template or CHATML)
    encoder = ChatEncoder(tok)
    text = encoder.render(sample.messages).text
    assert "You are a careful travel agent." in text and '"name": "book"' in text
    assert ("<tools>" in text) == (template is not None) and text.count("<|im_start|>system") == 1
    enc = encoder.encode(sample.messages)
    assert tok.decode(enc.input_ids[enc.trainable.astype(bool)]) == "Done.<|im_end|>"

    model = build_tiny_model_dir(tmp_path / "m", tokenizer=tok)
    data = tmp_path / "glaive.json"
    data.write_text(json.dumps([record, {**record, "system": "Be brief."}]))
    manifest = score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(model)))
    assert manifest["counts"]["samples"] == 2
    assert manifest["tool_rendering"] == ("chat template (tools=)" if template else "system prompt text")


def test_many_groups_with_mathtext_names_and_a_ratio_typo(tmp_path, tiny_model_dir):
    import json

    groups = [f"g{i:02d}" for i in range(11)] + ["$\\frac{1}{$"]
    rows = [
        {
            "source": g,
            "messages": [{"role": "user", "content": f"{g} {n}"}, {"role": "assistant", "content": f"ok {n}"}],
        }
        for n, g in enumerate(groups * 2)
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = tmp_path / "s"
    args = ["score", str(data), "--out", str(scores), "--model", str(tiny_model_dir), "--keep-fields", "source"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, ["prune", str(scores), "--out", str(tmp_path / "p"), "--group-by", "source", "--report"])
    assert res.exit_code == 0, res.output  # twelve groups, one of them spelling mathtext: drawn, not a crash
    res = runner.invoke(
        app, ["prune", str(scores), "--out", str(tmp_path / "q"), "--group-by", "source", "--group-ratios", "g1:0.5"]
    )
    out = " ".join(res.output.split())
    assert res.exit_code != 0 and "g1" in out and "no sample has" in out  # a typo of g01 is not silently ignored
    res = runner.invoke(app, ["prune", str(scores), "--out", "q", "--group-by", "source", "--group-ratios", "g01:0"])
    assert res.exit_code == 2 and "--group-ratios g01: must be a fraction in (0, 1]" in res.output  # not `--g01`


def test_malformed_files_are_one_line_errors(tmp_path, tiny_model_dir, tiny_run):
    """A non-UTF-8 pipeline YAML, a pickle checkpoint, a malformed lock file: one line each, never a traceback."""
    import pickle

    bad_yaml = tmp_path / "p.yaml"
    bad_yaml.write_bytes(b"run_dir: r\nscore:\n  input: caf\xe9.jsonl\n")
    res = runner.invoke(app, ["run", str(bad_yaml)])
    assert res.exit_code == 2 and "not UTF-8" in res.output and "Traceback" not in res.output

    model = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    res = runner.invoke(app, ["score", str(DEMO), "--out", str(tmp_path / "s"), "--model", str(model), "--limit", "2"])
    assert res.exit_code == 2 and "cannot load the model" in res.output and "Traceback" not in res.output

    out = tmp_path / "p"
    out.mkdir()
    (out / ".curate.lock").write_text('["not", "a", "lock"]')
    import os
    import time

    os.utime(out / ".curate.lock", (time.time() - 60, time.time() - 60))
    res = runner.invoke(app, ["prune", str(tiny_run / "scores"), "--out", str(out), "--ratio", "0.5"])
    assert res.exit_code == 0, res.output  # an old malformed lock is taken over (with a warning), not a traceback


def _hold(folder, hold_s, times, ready):
    from curate import io
    from curate.errors import CurateError

    ready.wait()  # all start together, as two runs launched at once
    try:
        with io.locked(folder):
            start = time.time()
            time.sleep(hold_s)
            times.put((start, time.time()))
    except CurateError:  # refused: the folder is in use
        times.put(None)


def test_two_processes_never_both_take_over_a_dead_holders_lock(tmp_path):
    """The takeover race: both find the same dead holder; only one may hold the folder at a time."""
    import json
    import multiprocessing
    import socket
    import subprocess

    ctx = multiprocessing.get_context("fork")  # the children only take a lock: no import time in each of 12
    for round_ in range(4):
        folder = tmp_path / f"f{round_}"
        folder.mkdir()
        dead = subprocess.Popen(["true"])
        dead.wait()  # a pid that is gone
        (folder / ".curate.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        times, ready = ctx.Queue(), ctx.Barrier(3)
        procs = [ctx.Process(target=_hold, args=(folder, 0.5, times, ready)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        spans = sorted(s for s in (times.get(timeout=5) for _ in procs) if s)
        assert spans  # someone took the dead holder's lock over
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end  # and never two at a time


def test_force_deletes_only_what_the_tool_wrote(tmp_path, tiny_run):
    """`--force`, as the error recommends, must not take a user's `data/raw/train.csv` with it; nor may a
    run delete a user's `.draft.tmp-1` anywhere under --out."""
    proj = tmp_path / "proj"
    user_files = [proj / "data" / "raw" / "train.csv", proj / "notes" / "deep" / ".draft.tmp-1", proj / "README"]
    for path in user_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    scores = str(tiny_run / "scores")
    res = runner.invoke(app, ["prune", scores, "--out", str(proj), "--force", "--ratio", "0.5"])
    assert res.exit_code == 2
    assert "proj/data/raw/train.csv was not written by `curate prune`" in " ".join(res.output.split())
    assert all(p.read_text() == "mine" for p in user_files)

    (proj / "data" / "raw" / "train.csv").unlink()
    for args in ([], ["--force"], ["--ratio", "0.25", "--force"]):  # a first run, a forced one, other settings
        res = runner.invoke(app, ["prune", scores, "--out", str(proj), "--ratio", "0.5", *args])
        assert res.exit_code == 0, res.output
        assert all(p.read_text() == "mine" for p in user_files if p.exists())
        assert (proj / "notes" / "deep" / ".draft.tmp-1").exists() and (proj / "README").exists()
    from curate import io

    assert io.verified(proj, "pruned", "")["config"]["ratio"] == 0.25  # the output is whole, with no stray shard


def test_a_stage_removes_only_its_own_files_when_settings_change(tmp_path):
    from curate import outdir

    out = tmp_path / "o"
    (out / "data").mkdir(parents=True)
    for name in ("data/train-00000-of-00001.parquet", "stats.json", "samples.parquet", "keep.txt", ".x.tmp-h-12"):
        (out / name).write_text("x")
    (out / "data" / ".train-00000-of-00001.parquet.tmp-host-7").write_text("x")
    outdir.clear(out, ("data/train-*.parquet", "samples.parquet", "stats.json"), {"files": [{"name": "../escape"}]})
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["data", "keep.txt"]
    (tmp_path / "escape").write_text("x")
    outdir.clear(out, (), {"files": [{"name": "../escape"}]})
    assert (tmp_path / "escape").exists()  # a manifest's names never reach outside OUT


def test_a_run_that_failed_before_writing_anything_does_not_block_the_fixed_command(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\0" * len(good))  # loads only after the run has started (and stamped --out)
    args = ["score", str(DEMO), "--out", str(tmp_path / "s"), "--model", str(model), "--limit", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and (tmp_path / "s" / ".run.json").exists()
    weights.write_bytes(good)  # the fix: another model hash, so another fingerprint; nothing was scored yet
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output


def test_out_inside_a_save_to_disk_input_resumes_and_reruns(tmp_path, tiny_model_dir):
    import json

    from datasets import Dataset

    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:6]]
    data = tmp_path / "ds"
    Dataset.from_list(rows).save_to_disk(str(data))
    args = ["score", str(data), "--out", str(data / "scores"), "--model", str(tiny_model_dir)]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already done" in " ".join(res.output.split())


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.125])
def test_batch_scope_keeps_the_exact_budget(tmp_path, ratio):
    """The issue's cases: --ratio 0.01 kept 125 of 1,000 and --ratio 0.3 kept 250 (a budget per batch of 8)."""
    import polars as pl

    from curate.config import PruneConfig
    from curate.triage import select

    rng = np.random.default_rng(0)
    coords = pl.DataFrame(
        {"id": [f"r{i}" for i in range(1000)], "ppl": rng.uniform(1, 50, 1000), "ent": rng.uniform(0, 5, 1000)}
    )
    df, _ = select(coords, PruneConfig(scores="", out="", ratio=ratio, scope="batch", batch_size=8))
    assert df["selection"].drop_nulls().len() == round(ratio * 1000)


def test_a_run_made_with_relative_paths_is_found_from_any_working_directory(tmp_path, tiny_run, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_run / "scores", work / "run" / "scores")
    (elsewhere / "run" / "scores").mkdir(parents=True)  # another run's folder of the same relative name
    monkeypatch.chdir(work)
    assert runner.invoke(app, ["prune", "run/scores", "--out", "run/pruned", "--ratio", "0.5"]).exit_code == 0
    some_id = pq.read_table(work / "run" / "pruned" / "samples.parquet")["id"][0].as_py()
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(app, ["inspect", str(work / "run" / "pruned"), "--id", some_id])
    assert res.exit_code == 0, res.output
    moved = shutil.move(work / "run", tmp_path / "moved")  # the folders of a run move together
    res = runner.invoke(app, ["inspect", str(moved / "pruned"), "--id", some_id])
    assert res.exit_code == 0, res.output


def test_input_edited_after_scoring_is_flagged_by_prune_and_verify(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", DEMO.read_text().splitlines()[:8])
    scores, pruned = tmp_path / "s", tmp_path / "p"
    assert runner.invoke(app, ["score", str(data), "--out", str(scores), "--model", str(tiny_model_dir)]).exit_code == 0
    with open(data, "a") as f:
        f.write(DEMO.read_text().splitlines()[9] + "\n")  # a row added after scoring
    res = runner.invoke(app, ["prune", str(scores), "--out", str(pruned)])
    assert res.exit_code == 2 and "data.jsonl changed after it was scored" in " ".join(res.output.split())
    assert not pruned.exists()
    res = runner.invoke(app, ["verify", str(scores)])
    assert res.exit_code == 1 and "changed after it was scored" in " ".join(res.output.split())
    res = runner.invoke(app, ["prune", str(scores), "--out", str(pruned), "--allow-changed-input"])
    assert res.exit_code == 0 and "warning" in res.output


def test_a_huge_row_is_a_counted_skip_read_in_pieces(tmp_path, tiny_model_dir):
    """One 5 MB JSONL line (a 50 MB one took 106 s and 6.9 GB) is skipped before it is parsed, by default; the rows
    around it keep their line numbers; a Parquet row above --max-row-bytes is skipped the same way."""
    import json

    import pyarrow as pa

    from curate import readers

    def row(i, text):
        return {"messages": [{"role": "user", "content": f"q{i} {text}"}, {"role": "assistant", "content": f"a{i}"}]}

    data = tmp_path / "rows.jsonl"
    lines = [json.dumps(row(0, "")), json.dumps(row(1, "x" * 5_000_000)), json.dumps(row(2, ""))]
    data.write_text("\n".join(lines) + "\n")
    got = list(readers.read_range(data, readers.plan(data, 10)[0], 4_000_000))
    assert [n for n, _ in got] == [1, 2, 3] and got[1][1].reason == "row_too_large" and got[2][1] == row(2, "")
    manifest = score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir)))
    assert manifest["skipped_by_reason"] == {"row_too_large": 1} and manifest["counts"]["samples"] == 2

    table = pa.Table.from_pylist([row(0, ""), row(1, "y" * 3000), row(2, "")])
    pq.write_table(table, tmp_path / "rows.parquet")
    cfg = ScoreConfig(input=str(tmp_path / "rows.parquet"), out=str(tmp_path / "p"), model=str(tiny_model_dir))
    manifest = score.run(cfg.model_copy(update={"max_row_bytes": 2000}))
    assert manifest["skipped_by_reason"] == {"row_too_large": 1}
    assert manifest["skipped_examples"][0]["row"] == 1
