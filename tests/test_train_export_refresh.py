"""curate train, curate export and curate refresh, end to end on the tiny model."""

import sys

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from curate import io
from curate.cli import app
from curate.schema import QUADRANTS
from curate.stages.export import JSONL_COLUMNS, TOKENIZED
from curate.stages.refresh import transition_table

from .conftest import DEMO, Recorder, cpu_sft_args, data_files

runner = CliRunner()


def text(res) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def stages_reused(res) -> int:
    """Stages that found their result done (the report, drawn after the loop, is not one of the loop's stages)."""
    return text(res).count("nothing to do") - text(res).count("report: already done")


def _pruned_rows(pruned):
    return {r["id"]: r for r in pq.read_table(data_files(pruned)).to_pylist()}


def _weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_train_lora_merges_into_a_plain_model_then_noop(tiny_run, tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    args = [
        "train",
        str(tiny_run / "pruned"),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = io.read_json(out / io.MANIFEST)
    assert manifest["counts"]["steps"] == 3 and len(manifest["loss_history"]) == 3
    assert not (out / "adapter_config.json").exists() and not (out / "checkpoints").exists()
    before, after = _weights(tiny_model_dir), _weights(out)
    assert before.keys() == after.keys()  # merged: the same plain architecture, loadable by the scorer
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched only the adapted projections
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "nothing to do" in text(res)


def test_interrupted_training_resumes_from_its_last_epoch_checkpoint(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from curate.config import TrainConfig
    from curate.stages import train

    original = train._loss_history_callback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # epoch 1 (2 steps) is checkpointed; stop inside epoch 2
                raise KeyboardInterrupt

    monkeypatch.setattr(train, "_loss_history_callback", lambda history, log: Interrupt())
    cfg = TrainConfig(
        data=str(tiny_run / "pruned"),
        out=str(tmp_path / "m"),
        model=str(tiny_model_dir),
        epochs=2,
        batch_size=10,
        lora_rank=0,
        device="cpu",
    )
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    assert (tmp_path / "m" / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "m" / io.MANIFEST).exists()
    monkeypatch.setattr(train, "_loss_history_callback", original)
    rec = Recorder()
    manifest = train.run(cfg, rec)
    assert any("resuming from" in m and "checkpoint-2" in m for m in rec.logs)
    assert manifest["counts"]["steps"] == 4 and [h["step"] for h in manifest["loss_history"]] == [3, 4]


def test_train_rejects_data_from_another_tokenizer(tiny_model_dir, tmp_path):
    import pyarrow as pa

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 99999]], "labels": [[-100, 2, 99999]]}), bad)
    res = runner.invoke(app, ["train", str(bad), "--model", str(tiny_model_dir), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "99999" in text(res) and "another model" in text(res)
    res = runner.invoke(app, ["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no Parquet files" in text(res)


@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl", "trl", "jsonl"])
def test_export_loads_in_the_shape_each_framework_expects(tiny_run, tmp_path, fmt):
    from datasets import DatasetDict, load_dataset, load_from_disk

    out = tmp_path / fmt
    res = runner.invoke(app, ["export", str(tiny_run / "pruned"), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 0, res.output
    expected = _pruned_rows(tiny_run / "pruned")
    if fmt == "llamafactory":  # what LLaMA-Factory does with tokenized_path: load_from_disk, take "train"
        dd = load_from_disk(str(out / "tokenized"))
        assert isinstance(dd, DatasetDict) and list(dd) == ["train"]
        ds, config = dd["train"], yaml.safe_load((out / "llamafactory_sft.yaml").read_text())
        assert config["tokenized_path"] == str((out / "tokenized").resolve()) and config["stage"] == "sft"
    elif fmt == "axolotl":  # pre-tokenised rows, exactly three columns, and no `type:` in the config
        ds, config = (
            load_dataset("json", data_files=str(out / "data.jsonl"), split="train"),
            yaml.safe_load((out / "axolotl.yaml").read_text()),
        )
        assert config["datasets"][0]["type"] is None and config["datasets"][0]["ds_type"] == "json"
    elif fmt == "trl":
        ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
        compile((out / "train_trl.py").read_text(), "train_trl.py", "exec")
    else:
        ds = load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
        compile((out / "load.py").read_text(), "load.py", "exec")
    wanted = {"llamafactory": TOKENIZED, "axolotl": TOKENIZED, "trl": ["input_ids", "labels"], "jsonl": JSONL_COLUMNS}
    assert sorted(ds.column_names) == sorted(wanted[fmt])
    assert len(ds) == len(expected)
    got = sorted((r["input_ids"], r["labels"]) for r in ds)
    assert got == sorted((r["input_ids"], r["labels"]) for r in expected.values())
    assert "config written to" in text(res)
    res = runner.invoke(app, ["export", str(tiny_run / "pruned"), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 0  # an earlier export is replaced
    res = runner.invoke(app, ["export", str(tiny_run / "pruned"), "--format", fmt, "--out", str(tiny_run / "scores")])
    assert res.exit_code == 2 and "not a `curate export` folder" in text(res)


def test_export_trl_trains_in_sft_trainer(tiny_run, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    out = tmp_path / "trl"
    assert runner.invoke(app, ["export", str(tiny_run / "pruned"), "--format", "trl", "--out", str(out)]).exit_code == 0
    ds = load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    args = cpu_sft_args(tmp_path / "o", max_steps=1)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    assert trainer.train().global_step == 1


def brute_transitions(a: dict, b: dict):
    counts = {q: {p: 0 for p in QUADRANTS} for q in QUADRANTS}
    for sid in a:
        if sid in b:
            counts[a[sid][0]][b[sid][0]] += 1
    return counts, sum(1 for s in a if s in b and a[s][1] and b[s][1])


def test_transition_table_matches_brute_force():
    import random

    rng = random.Random(0)
    a = {f"s{i}": (rng.choice(QUADRANTS), rng.random() < 0.3) for i in range(200)}
    b = {f"s{i}": (rng.choice(QUADRANTS), rng.random() < 0.3) for i in range(20, 230)}
    frame = lambda d: pl.DataFrame(
        {"id": list(d), "quadrant": [v[0] for v in d.values()], "kept": [v[1] for v in d.values()]}
    )
    got = transition_table(frame(a), frame(b))
    counts, both = brute_transitions(a, b)
    assert got["counts"] == counts and got["kept_both"] == both and got["samples"] == 180
    assert got["stayed"] == sum(counts[q][q] for q in QUADRANTS)


def _refresh_args(out, tiny_model_dir, rounds):
    return [
        "refresh",
        str(DEMO),
        "--out",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--limit",
        "40",
        "--rounds",
        str(rounds),
        "--ratio",
        "0.5",
        "--max-steps",
        "3",
        "--lora-rank",
        "0",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
    ]


def test_refresh_two_rounds_end_to_end_and_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "refresh"
    res = runner.invoke(app, _refresh_args(out, tiny_model_dir, 1))  # stops after round 1, as an interruption would
    assert res.exit_code == 0, res.output
    first_scores = {p: p.stat().st_mtime_ns for p in (out / "round-01" / "scores").glob("*")}
    res = runner.invoke(app, _refresh_args(out, tiny_model_dir, 2))
    assert res.exit_code == 0, res.output
    assert stages_reused(res) == 3  # round 1's score, prune and train were reused
    assert {p: p.stat().st_mtime_ns for p in (out / "round-01" / "scores").glob("*")} == first_scores
    for r in ("round-01", "round-02"):
        for stage in ("scores", "pruned", "model"):
            assert (out / r / stage / io.MANIFEST).exists(), (r, stage)
    score2 = io.read_json(out / "round-02" / "scores" / io.MANIFEST)
    assert score2["model"]["path"] == str((out / "round-01" / "model").resolve())
    assert score2["counts"]["samples"] == 40  # the FULL input is rescored, not only the kept samples
    lp = [
        pq.read_table(sorted((out / r / "scores").glob("part-*.parquet")), columns=["logprob"])
        .column("logprob")
        .to_pylist()
        for r in ("round-01", "round-02")
    ]
    assert lp[0] != lp[1]  # the new checkpoint scores differently
    summary = io.read_json(out / io.MANIFEST)["summary"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and all(r["K"] == 20 for r in summary["rounds"])
    (t,) = summary["transitions"]
    assert sum(sum(row.values()) for row in t["counts"].values()) == t["samples"] == 40
    assert "quadrants, round 1 -> 2" in text(res)
    page = (out / "report" / "report.html").read_text()  # the report of a refresh run: last round + transitions
    assert 'id="refresh"' in page and "Round 1 &rarr; 2" in page and page.count("<tr><th>Q") == 4
    # An interruption inside round 2's training: only that stage runs again.
    (out / "round-02" / "model" / io.MANIFEST).unlink()
    res = runner.invoke(app, _refresh_args(out, tiny_model_dir, 2))
    assert res.exit_code == 0 and stages_reused(res) == 5, res.output


def test_refresh_with_a_user_training_command(tmp_path, tiny_model_dir):
    out = tmp_path / "refresh"
    cmd = (
        f"{sys.executable} -m curate.cli train {{data}} --model {{model}} --out {{out}} --max-steps 2 "
        "--lora-rank 0 --device cpu"
    )
    res = runner.invoke(app, _refresh_args(out, tiny_model_dir, 1) + ["--train-cmd", cmd])
    assert res.exit_code == 0, res.output
    assert (out / "round-01" / "model" / "config.json").exists()
    assert (
        "training:" in text(res)
        and str(tiny_model_dir) in io.read_json(out / "round-01" / "model" / io.MANIFEST)["command"]
    )
    res = runner.invoke(app, _refresh_args(out, tiny_model_dir, 1) + ["--train-cmd", "echo {data}"])
    assert res.exit_code == 2 and "{out}" in text(res)
    res = runner.invoke(app, _refresh_args(tmp_path / "r2", tiny_model_dir, 1) + ["--train-cmd", "true {data} {out}"])
    assert res.exit_code == 2 and "holds no model" in text(res)
    res = runner.invoke(app, _refresh_args(tmp_path / "r3", tiny_model_dir, 1) + ["--ratio", "2", "--lr", "0"])
    assert res.exit_code == 2 and "prune.ratio" in text(res) and "train.lr" in text(res)
