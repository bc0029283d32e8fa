"""`curate train` as a user runs it: bfloat16 autocast against float32, data without loss tokens, and --dynamic on a
scores folder (Q-Tuning inside the trainer)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import io
from curate.cli import app
from curate.pruning import budget

runner = CliRunner()
TINY = ["--device", "cpu", "--lora-rank", "0", "--lr", "3e-3", "--scheduler", "constant", "--warmup", "0"]


def text(res) -> str:
    return " ".join(res.output.split())


def write_rows(path, rows):
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "input_ids": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "labels": pa.array([r[2] for r in rows], pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path)
    return path


def test_data_without_a_loss_token_is_refused(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "none.parquet", [(f"r{i}", [5, 6, 7, 8], [-100] * 4) for i in range(4)])
    res = runner.invoke(app, ["train", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "m"), *TINY])
    assert res.exit_code != 0 and "no sample has a loss token" in text(res), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # one line, no traceback
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_samples_without_a_loss_token_are_left_out_and_named(tiny_model_dir, tmp_path):
    rows = [(f"empty-{i}", [5, 6, 7, 8], [-100] * 4) for i in range(4)]
    rows += [(f"good-{i}", [5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]) for i in range(4)]
    data = write_rows(tmp_path / "some.parquet", rows)
    out = tmp_path / "m"
    args = ["train", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "4", *TINY]
    res = runner.invoke(app, [*args, "--max-steps", "4"])
    assert res.exit_code == 0, res.output
    assert "4 samples without a loss token left out" in text(res) and "'empty-0'" in text(res)
    manifest = io.read_manifest(out)
    assert manifest["counts"]["samples"] == 4 and manifest["counts"]["samples_without_loss_tokens"] == 4
    history = manifest["loss_history"]
    assert len(history) == 4 and all(h["loss"] > 0 and h["loss_tokens"] > 0 for h in history)


def test_bfloat16_autocast_tracks_float32_on_the_same_seed(tiny_run, tiny_model_dir, tmp_path):
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["train", str(tiny_run / "pruned"), "--model", str(tiny_model_dir), "--out", str(out), *TINY]
        res = runner.invoke(app, [*args, "--dtype", dtype, "--max-steps", "8", "--batch-size", "4"])
        assert res.exit_code == 0, res.output
        assert f"({dtype})" in text(res)
        manifest = io.read_manifest(out)
        assert manifest["dtype"] == dtype
        curves[dtype] = [h["loss"] for h in manifest["loss_history"]]
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert len(fp32) == len(bf16) == 8
    assert fp32 != bf16  # autocast did compute in bfloat16
    for a, b in zip(fp32, bf16):  # the same data order and the same descent, within bfloat16's precision
        assert b == pytest.approx(a, rel=0.03)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]


def test_dynamic_training_on_a_scores_folder_selects_in_every_micro_batch(tiny_run, tiny_model_dir, tmp_path):
    out = tmp_path / "dynamic"
    args = ["train", str(tiny_run / "scores"), "--model", str(tiny_model_dir), *TINY, "--batch-size", "8"]
    res = runner.invoke(app, [*args, "--out", str(out), "--dynamic", "--ratio", "0.25", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    manifest = io.read_manifest(out)
    counts = manifest["counts"]
    sizes = [8, 8, 8, 8, 8]  # the 40 scored rows in batches of 8
    assert counts["steps"] == 5 and counts["trained_samples"] == 40
    assert sum(manifest["kept_by_selection"].values()) == sum(budget(0.25, n) for n in sizes)
    assert set(manifest["kept_by_selection"]) <= {"Q2", "Q4", "fill-Q2", "fill-Q4"}
    assert 0 < counts["trained_loss_tokens"] < 0.5 * counts["trained_label_tokens"]
    scores = pq.read_table(sorted((tiny_run / "scores").glob("part-*.parquet")), columns=["n_tokens"])
    assert counts["forward_tokens"] == sum(scores.column("n_tokens").to_pylist())  # every row through the forward
    for step in manifest["loss_history"]:
        assert sum(v for k, v in step.items() if k.startswith("kept_")) == 2
    assert "kept in the micro-batches" in text(res) and "tokens through the forward pass" in text(res)
    # without --dynamic a scores folder is full data: every sample whole
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "full"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    full = io.read_manifest(tmp_path / "full")["counts"]
    assert full["trained_loss_tokens"] == full["trained_label_tokens"] == full["loss_tokens"]
    json.dumps(manifest)  # the manifest is plain JSON


def test_selection_options_without_dynamic_are_refused(tiny_run, tiny_model_dir, tmp_path):
    """--ratio and the other selection options act inside the trainer only: without --dynamic they would change
    the fingerprint and nothing else."""
    out = tmp_path / "m"
    args = ["train", str(tiny_run / "scores"), "--model", str(tiny_model_dir), "--out", str(out), *TINY]
    res = runner.invoke(app, [*args, "--ratio", "0.25", "--token-order", "drop-high"])
    assert res.exit_code != 0 and "--ratio, --token-order: selection options act inside the trainer only" in text(res)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (out / "model.safetensors").exists()
