"""Trust, round three: each test reproduces one way a hostile user made q-curate lose, leak or misreport data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from curate.config import ExportConfig, PruneConfig
from curate.stages import export
from curate.stages.prune import run as prune
from curate.synthetic import synthetic_scores

PER_TOKEN = {"token_unit": "token", "protect": []}  # synthetic scores have no tokenizer to read text with


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    synthetic_scores(d, 16, mean_tokens=20, shard_size=8)
    return d


def ids_in(folder) -> list[str]:
    return sorted(pq.read_table(sorted((folder / "data").glob("train-*.parquet")), columns=["id"])["id"].to_pylist())


def test_a_pruned_folder_reads_back_as_itself_through_a_shared_datasets_cache(tmp_path, scores):
    """`datasets` keys a local folder's cache by its name and card, not its files: two folders named `pruned`
    read back the first one's rows, and so did a folder pruned again."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"  # one cache for every read, as a user's is
    a, b = tmp_path / "a" / "pruned", tmp_path / "b" / "pruned"
    prune(PruneConfig(scores=str(scores), out=str(a), ratio=0.25, **PER_TOKEN))
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.5, **PER_TOKEN))

    def read(folder):
        return sorted(datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))["id"])

    assert read(a) == ids_in(a) and len(ids_in(a)) == 4
    assert read(b) == ids_in(b) and len(ids_in(b)) == 8
    # pruned again into the same folder: the same number of rows, other masks
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.5, token_ratio=0.25, **PER_TOKEN))
    fresh = datasets.load_dataset(str(b), split="train", cache_dir=str(cache))
    on_disk = pq.read_table(sorted((b / "data").glob("train-*.parquet"))).to_pylist()
    assert sorted(map(tuple, fresh["loss_mask"])) == sorted(tuple(r["loss_mask"]) for r in on_disk)
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.75, **PER_TOKEN))
    assert read(b) == ids_in(b) and len(ids_in(b)) == 12


def test_exports_read_back_their_own_rows_after_a_re_export(tmp_path, scores):
    """The TRL script and the JSONL loader load the export with `datasets`, whose cache the user's machine shares
    between runs: an export written again into the same folder must read back as the new rows."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache")}
    for fmt, script in (("trl", "train_trl.py"), ("jsonl", "load.py")):
        out = tmp_path / f"export-{fmt}"
        for ratio in (0.25, 0.5):
            pruned = tmp_path / f"pruned-{ratio}"
            prune(PruneConfig(scores=str(scores), out=str(pruned), ratio=ratio, **PER_TOKEN))
            export.run(ExportConfig(pruned=str(pruned), format=fmt, out=str(out)))
            # the script's own loading line, then the row count (the TRL script would go on to train)
            code = (out / script).read_text().split("\ngpu =")[0].replace("print(dataset)", "")
            code += "\nprint(dataset.num_rows)"
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert int(done.stdout.split()[-1]) == len(ids_in(pruned)), (fmt, ratio)


def test_the_card_names_the_data_it_describes(tmp_path, scores):
    prune(PruneConfig(scores=str(scores), out=str(tmp_path / "p"), ratio=0.25, **PER_TOKEN))
    manifest = json.loads((tmp_path / "p" / "_manifest.json").read_text())
    card = (tmp_path / "p" / "README.md").read_text()
    from curate.card import data_identity

    data = [f for f in manifest["files"] if f["name"].startswith("data/")]
    assert f"files {data_identity(data)}" in card and "num_examples: 4" in card
