"""kill -9 at several points of score, prune, retokenize and a refresh round: a rerun of the same command finishes
the job, with no duplicate and no missing row, and equals an undisturbed run."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from curate import io
from curate.config import PruneConfig, ScoreConfig
from curate.stages import prune, score
from curate.synthetic import synthetic_scores

from ..conftest import DEMO, kill_when

pytestmark = pytest.mark.slow  # real processes, killed at real moments: minutes


def curate(*args) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *map(str, args)]


def rows(folder, pattern="part-*.parquet"):
    return json.dumps(pq.read_table(sorted(folder.glob(pattern))).to_pylist())  # NaN-safe comparison


@pytest.mark.parametrize("after_shards", [1, 3])
def test_score_killed_after_some_shards_resumes_to_the_same_result(tmp_path, tiny_model_dir, after_shards):
    args = [DEMO, "--model", tiny_model_dir, "--limit", "60", "--shard-size", "10"]
    subprocess.run(curate("score", *args, "--out", tmp_path / "undisturbed"), check=True, capture_output=True)
    out = tmp_path / "killed"
    kill_when(curate("score", *args, "--out", out), lambda: len(list(out.glob("part-*.parquet"))) >= after_shards)
    assert not (out / io.MANIFEST).exists()
    done = subprocess.run(curate("score", *args, "--out", out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "taking over" in done.stderr  # the dead run's lock is taken over
    assert rows(out) == rows(tmp_path / "undisturbed")
    ids = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 60
    assert not list(out.glob(".*.tmp-*")) and not (out / ".curate.lock").exists()


def test_prune_killed_while_writing_masks_is_redone_whole(tmp_path):
    scores = tmp_path / "scores"
    synthetic_scores(scores, 60_000, mean_tokens=60, shard_size=4_000)
    subprocess.run(
        curate(
            "prune",
            scores,
            "--out",
            tmp_path / "undisturbed",
            "--ratio",
            "0.5",
            "--token-unit",
            "token",
            "--protect",
            "none",
        ),
        check=True,
        capture_output=True,
    )
    out = tmp_path / "killed"
    kill_when(
        curate("prune", scores, "--out", out, "--ratio", "0.5", "--token-unit", "token", "--protect", "none"),
        lambda: any((out / "data").glob("train-*")),
    )
    assert not (out / io.MANIFEST).exists()
    done = subprocess.run(
        curate("prune", scores, "--out", out, "--ratio", "0.5", "--token-unit", "token", "--protect", "none"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert rows(out, "data/train-*.parquet") == rows(tmp_path / "undisturbed", "data/train-*.parquet")
    stats = [
        {k: v for k, v in io.read_json(d / "stats.json").items() if k != "config"}
        for d in (out, tmp_path / "undisturbed")
    ]
    assert stats[0] == stats[1]


def test_retokenize_killed_between_files_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    """Retokenize carries one pruned file per shard: killed after two, the rerun keeps them (the executor's mark
    says this run wrote them) and carries the rest, to the files and stats of an undisturbed run."""
    scores, pruned = tmp_path / "scores", tmp_path / "pruned"
    score.run(ScoreConfig(input=str(DEMO), out=str(scores), model=str(tiny_model_dir), shard_size=4))
    prune.run(PruneConfig(scores=str(scores), out=str(pruned), ratio=0.5, token_ratio=0.5))
    files = len(list((pruned / "data").glob("train-*.parquet")))
    assert files > 40  # enough files that the kill lands between two of them
    subprocess.run(
        curate("retokenize", pruned, "--model", tiny_model_dir, "--out", tmp_path / "undisturbed"),
        check=True,
        capture_output=True,
    )
    out = tmp_path / "killed"
    command = curate("retokenize", pruned, "--model", tiny_model_dir, "--out", out)
    kill_when(command, lambda: len(list((out / "data").glob("train-*.parquet"))) >= 2)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("train-*.parquet")}
    assert 2 <= len(kept) < files and not (out / io.MANIFEST).exists()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {len(kept)} of {files} shards are already done" in " ".join(done.stderr.split())
    assert {n: (out / "data" / n).stat().st_mtime_ns for n in kept} == kept  # not written again
    assert rows(out, "data/train-*.parquet") == rows(tmp_path / "undisturbed", "data/train-*.parquet")
    stats = [io.read_json(d / "stats.json") for d in (out, tmp_path / "undisturbed")]
    assert stats[0] == stats[1]


def test_a_refresh_round_killed_in_training_resumes_there(tmp_path, tiny_model_dir):
    out = tmp_path / "refresh"
    args = curate(
        "refresh",
        DEMO,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--limit",
        "40",
        "--rounds",
        "1",
        "--ratio",
        "0.5",
        "--max-steps",
        "40",
        "--lora-rank",
        "0",
        "--batch-size",
        "2",
    )
    model = out / "round-01" / "model"
    kill_when(args, lambda: (model / ".run.json").exists())
    scores = {p.name: p.stat().st_mtime_ns for p in (out / "round-01" / "scores").iterdir()}
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "round-01" / "scores").iterdir()} == scores  # not redone
    assert io.read_json(model / io.MANIFEST)["counts"]["steps"] == 40
    assert io.read_json(out / io.MANIFEST)["summary"]["rounds"][0]["K"] == 20
