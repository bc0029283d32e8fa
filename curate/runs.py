"""Finding a run's parts from any folder a user points at, through the manifests that wrote them.

A user may name a run folder (`scores/` + `pruned/`, as `curate run` and `curate demo` write), a `curate prune`
folder (its scores are where its manifest says), or a `curate refresh` folder (its last round). Every folder
is verified before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from . import io, kinds, storage
from .errors import CurateError
from .kinds import Pruned, Scores

HINT = "run `curate score` and `curate prune` first (as `curate run` and `curate demo` do)"


@dataclass(frozen=True)
class Run:
    pruned: Path
    scores: Path
    pruned_manifest: Pruned  # each as its kind's contract (curate.kinds): typed, no key read with a default
    scores_manifest: Scores
    refresh: dict | None  # the refresh manifest's summary, for a refresh folder

    def score_files(self) -> list[Path]:
        return [self.scores / f["name"] for f in self.scores_manifest["files"]]

    def pruned_files(self) -> list[Path]:
        return io.pruned_data_files(self.pruned, self.pruned_manifest)


def locate(where: str | Path) -> Run:
    """The run at `where` (a path or a URL: then the folders it needs are fetched into working copies)."""
    path = storage.materialized(where)
    manifest = io.read_manifest(path) if path.is_dir() else None
    refresh = None
    if manifest and manifest["stage"] == "refresh":
        refresh = manifest["summary"]
        path = path / refresh["rounds"][-1]["dir"]
        manifest = None
    if manifest and io.manifest_kind(manifest) == "run":  # a pipeline's folder: its last step that produced pruned data
        pruned_steps = [s for s in manifest.get("steps", []) if s["kind"] in ("pruned", "refresh")]
        if not pruned_steps:
            raise CurateError(f"{where}: the pipeline run there has no prune step; nothing to show")
        step = pruned_steps[-1]
        return locate(storage.join(where, step["out"]) if storage.is_url(where) else path / step["out"])
    if manifest and io.manifest_kind(manifest) == "pruned":
        pruned, pruned_at = path, where
    elif manifest is None:
        pruned_at = storage.join(where, "pruned")
        pruned = storage.materialized(pruned_at) if storage.is_url(where) else path / "pruned"
    else:
        raise CurateError(
            f"{where} holds the output of `curate {manifest['stage']}`; point at a run folder, a "
            "`curate prune` folder or a `curate refresh` folder"
        )
    pruned_manifest = kinds.typed(io.verified(pruned, "pruned", HINT), "pruned", str(pruned))
    source = pruned_manifest["inputs"][0]
    scores_at = storage.resolve(pruned_at if storage.is_url(pruned_at) else pruned, source["path"])
    if (source.get("kind") or io.LEGACY_KINDS.get(source.get("stage"))) == "pruned":
        # a re-tokenised folder: the scores are those of the pruned folder it came from
        return locate(scores_at)
    scores = storage.materialized(scores_at)
    scores_manifest = kinds.typed(io.verified(scores, "scores", HINT), "scores", str(scores))
    return Run(pruned, scores, pruned_manifest, scores_manifest, refresh)


def rows_by_id(paths: list[Path], ids: list[str], columns: list[str] | None = None) -> dict[str, dict]:
    """The rows of these Parquet files whose id is in `ids` (pushed down to the reader as a filter)."""
    return {
        r["id"]: r
        for path in paths
        for r in pq.read_table(path, columns=columns, filters=[("id", "in", ids)]).to_pylist()
    }


def scoring_tokenizer(run: Run):
    """The tokenizer of the model that wrote the scores, as its manifest records it."""
    from .models import load_tokenizer_from

    model = run.scores_manifest.model
    return load_tokenizer_from(model["path"], model["name"])


def token_rows(tokenizer, score_row: dict, loss_mask: list | None, lam: float, scale: str = "ppl") -> list[dict]:
    """A scored sample token by token, as every view shows it: its text (`t`), id, kind (`k`: prompt, kept,
    pruned, or dropped for a response whose sample was not kept, `loss_mask` None), log-prob, entropy and, on
    trainable tokens, the pruning score (`s`)."""
    import numpy as np

    from .pruning import context_scores

    trainable = np.asarray(score_row["trainable"], dtype=np.int8)
    lp = np.asarray(score_row["logprob"], dtype=np.float32)
    ent = np.asarray(score_row["entropy"], dtype=np.float32)
    score = context_scores(np.nan_to_num(lp), trainable, lam, scale)
    rows = []
    for i, tid in enumerate(score_row["input_ids"]):
        if not trainable[i]:
            kind = "prompt"
        elif loss_mask is None:
            kind = "dropped"
        else:
            kind = "kept" if loss_mask[i] else "pruned"
        rows.append(
            {
                "t": tokenizer.decode([tid]),
                "id": tid,
                "k": kind,
                "lp": float(lp[i]),
                "ent": float(ent[i]),
                "s": float(score[i]) if trainable[i] else None,
            }
        )
    return rows
