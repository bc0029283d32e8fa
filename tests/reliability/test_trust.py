"""Trust, round two: what a hostile or careless user can do that must not silently reuse or lose data."""

import shutil
import time

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from curate.cli import app
from curate.config import ScoreConfig
from curate.stages import score

from ..conftest import DEMO, Recorder, build_tiny_model_dir

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


def test_a_sharegpt_system_prompt_survives_tools():
    from curate.formats import Sample, to_sample

    record = {
        "system": "You are a careful travel agent.",
        "tools": '[{"name": "book", "parameters": {}}]',
        "conversations": [{"from": "human", "value": "book it"}, {"from": "gpt", "value": "Done."}],
    }
    sample = to_sample(0, record, "sharegpt", {})
    assert isinstance(sample, Sample)
    system = sample.messages[0]
    assert system["role"] == "system" and sum(m["role"] == "system" for m in sample.messages) == 1
    assert system["content"].startswith("You are a careful travel agent.") and '"name": "book"' in system["content"]


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

    ctx = multiprocessing.get_context("spawn")
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
