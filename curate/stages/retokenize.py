"""`curate retokenize PRUNED --model TARGET --out DIR`: score with a small model, train any model.

Sample selection does not depend on the tokenizer; token masks do. Each kept conversation is rendered with the
TARGET tokenizer's own chat template and its assistant turns located as the scorer locates them
(`tokenization.ChatEncoder`). Within each assistant turn, the source loss mask becomes a set of kept characters
of the turn's content (relative to the content, so templates may differ around it); a target token stays in the
loss only if every content character it covers was kept (a token straddling kept and pruned text is pruned).
End-of-turn markers stay in the loss; prompts stay out. Output: the pruned layout in the target's token ids,
with per-sample `loss_tokens_source` / `loss_tokens_target`, and in stats.json how closely the token budget
carried over (kept loss characters after / before). One shard per pruned file: a killed run resumes at the file it
was on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io, schema
from ..config.retokenize import RetokenizeConfig
from ..errors import CurateError, RowError
from ..executor import Job, identify_model, runner
from ..formats import join_tools
from ..kinds import Pruned
from ..registry import register
from ..stage import Cli, Input, Shards, Stage, Worker
from ..tokenization import ChatEncoder, Rendered, in_span

SCHEMA = pa.schema(list(schema.PRUNED) + [("loss_tokens_source", pa.int32()), ("loss_tokens_target", pa.int32())])


def kept_characters(rendered: Rendered, starts, ends, loss_mask: np.ndarray) -> list[np.ndarray]:
    """Per assistant turn, a boolean per content character: covered by a token that is in the loss."""
    kept = []
    for lo, hi in rendered.contents:
        chars = np.zeros(hi - lo, dtype=bool)
        for s, e in zip(starts[loss_mask == 1], ends[loss_mask == 1]):
            a, b = max(s, lo), min(e, hi)
            if a < b:
                chars[a - lo : b - lo] = True
        kept.append(chars)
    return kept


def content_offset(source: str, target: str) -> int:
    """Where the target's rendering of a turn's content sits in the source's (templates may trim it)."""
    if source == target:
        return 0
    at = source.find(target)
    if at < 0 or not target.strip():
        raise RowError("content_mismatch", "the two chat templates render this turn's content differently")
    return at


def project(src: Rendered, src_kept: list[np.ndarray], tgt: Rendered, starts, ends) -> np.ndarray:
    """The target loss mask: assistant tokens whose content characters were all kept, and every end-of-turn
    marker; nothing else."""
    mask = np.zeros(len(starts), dtype=np.int8)
    for (lo, hi), (c_lo, c_hi), (s_lo, s_hi), kept in zip(tgt.spans, tgt.contents, src.contents, src_kept):
        shift = content_offset(src.text[s_lo:s_hi], tgt.text[c_lo:c_hi])
        for t in np.flatnonzero(in_span(tgt.text, starts, ends, lo, hi)):
            a, b = max(starts[t], c_lo), min(ends[t], c_hi)
            if a >= b:  # no content character: the end-of-turn marker (or layout around it)
                mask[t] = int(starts[t] >= c_hi)
            else:
                mask[t] = int(kept[a - c_lo + shift : b - c_lo + shift].all())
    mask[0] = 0
    return mask


def retokenize_row(row: dict, source: ChatEncoder, target: ChatEncoder) -> dict:
    conversation = join_tools(row["messages"], row.get("tools"))
    src = source.render(conversation)
    src_ids, src_starts, src_ends = source.tokenize(src.text)
    n = len(row["input_ids"])
    if not np.array_equal(src_ids[:n], np.asarray(row["input_ids"])):
        raise RowError("source_mismatch", "the pruned row's tokens are not the scoring tokenizer's rendering")
    loss = np.zeros(len(src_ids), dtype=np.int8)
    loss[:n] = row["loss_mask"]  # tokens cut by truncation were never in the loss
    kept = kept_characters(src, src_starts, src_ends, loss)
    tgt = target.render(conversation)
    ids, starts, ends = target.tokenize(tgt.text)
    mask = project(src, kept, tgt, starts, ends)
    if target.max_length is not None and len(ids) > target.max_length:
        ids, mask, starts, ends = (
            ids[: target.max_length],
            mask[: target.max_length],
            starts[: target.max_length],
            ends[: target.max_length],
        )
    if not mask.any():
        raise RowError("no_trainable_tokens", "no loss token left in the target's tokens")
    kept_src = int(sum(k.sum() for k in kept))
    kept_tgt = 0
    for c_lo, c_hi in tgt.contents:
        covered = np.zeros(c_hi - c_lo, dtype=bool)
        for s, e in zip(starts[mask == 1], ends[mask == 1]):
            a, b = max(s, c_lo), min(e, c_hi)
            if a < b:
                covered[a - c_lo : b - c_lo] = True
        kept_tgt += int(covered.sum())
    labels = np.where(mask == 1, ids, schema.IGNORE_INDEX).astype(np.int32)
    return {
        "id": row["id"],
        "messages": row["messages"],
        "tools": row.get("tools"),
        "input_ids": ids,
        "attention_mask": np.ones(len(ids), np.int8),
        "labels": labels,
        "loss_mask": mask,
        "assistant_masks": mask,
        "quadrant": row["quadrant"],
        "selection": row["selection"],
        "ppl": row["ppl"],
        "ent": row["ent"],
        "loss_tokens_source": int(np.asarray(row["loss_mask"]).sum()),
        "loss_tokens_target": int(mask.sum()),
        "_chars": (kept_src, kept_tgt),
    }


# ---------------------------------------------------------------- the shards, as the executor runs them: one per
# pruned data file, each carried over whole, so a killed run resumes at the file it was on


@dataclass(frozen=True)
class Part:
    index: int
    name: str  # the pruned data file, relative to the input and to OUT alike (data/train-...)


@dataclass(frozen=True)
class Carry:
    """What every worker needs: where the pruned files are, and the two tokenizers (by path and name)."""

    pruned: str
    source: dict  # the scoring model's entry in the pruned manifest
    target_path: str
    target_name: str
    max_length: int | None


class Retokenizer(Worker):
    """Carries pruned files over to the target's tokens (both tokenizers loaded once, for every file)."""

    def __init__(self, work: Carry, output, gpus: float = 0):
        from ..models import load_tokenizer_from
        from ..tokenization import ensure_chat_template

        self.work, self.output = work, output
        source_tok = load_tokenizer_from(work.source["path"], work.source["name"])
        target_tok = load_tokenizer_from(work.target_path, work.target_name)
        for tok in (source_tok, target_tok):
            ensure_chat_template(tok)
        self.source, self.target = ChatEncoder(source_tok), ChatEncoder(target_tok, work.max_length)

    def run(self, part: Part, progress=lambda units, tokens=0: None) -> dict:
        counts = {key: 0 for key in TOTALS}
        skipped: dict[str, int] = {}
        left_out, rows = [], []
        for row in pq.read_table(Path(self.work.pruned) / part.name).to_pylist():
            try:
                r = retokenize_row(row, self.source, self.target)
            except RowError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                left_out.append(f"warning: sample {row['id']!r} is left out: {e}")
                continue
            a, b = r.pop("_chars")
            counts["kept_chars_source"] += a
            counts["kept_chars_target"] += b
            for key in ("loss_tokens_source", "loss_tokens_target"):
                counts[key] += r[key]
            rows.append(r)
        counts["samples"] = len(rows)
        done = {"counts": counts, "skipped": skipped, "left_out": left_out}
        # what the file's rows added up to travels with it: a resumed run adds up the files it keeps from it
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        self.output.write_parquet(part.name, table, {"curate_version": __version__, "carried": json.dumps(done)})
        return done


TOTALS = ("samples", "loss_tokens_source", "loss_tokens_target", "kept_chars_source", "kept_chars_target")


def plan(job: Job) -> list[Part]:
    pruned = job.inputs["pruned"]
    files = io.pruned_data_files(pruned, job.manifests["pruned"])
    return [Part(i, str(f.relative_to(pruned))) for i, f in enumerate(files)]


def work(job: Job) -> Carry:
    target = job.context["target"]
    source = job.manifests["pruned"].model
    return Carry(str(job.inputs["pruned"]), source, target.path, target.name, job.cfg.max_length)


def reduce(job: Job, parts: list[Part], results: dict, info: dict) -> dict:
    """Every file's counts (those of an earlier attempt read from the files), then stats.json; the manifest's
    fields."""
    cfg, pruned, source_manifest, target = job.cfg, job.inputs["pruned"], job.manifests["pruned"], job.context["target"]
    totals = {key: 0 for key in TOTALS}
    skipped: dict[str, int] = {}
    for part in parts:
        done = results.get(part.index) or json.loads(io.parquet_metadata(job.out / part.name)["carried"])
        for line in done["left_out"]:
            job.log(line)
        for key in TOTALS:
            totals[key] += done["counts"][key]
        for reason, n in done["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    if not totals["samples"]:
        raise CurateError(f"{pruned}: no sample could be carried over to {cfg.model} ({skipped})")
    stats = {
        **totals,
        "skipped": skipped,
        "N": source_manifest.stats["N"],  # a pruned folder's figures, so that retokenize's output is one too
        "K": totals["samples"],
        "source_samples": source_manifest.stats["K"],
        "kept_chars_ratio": totals["kept_chars_target"] / max(totals["kept_chars_source"], 1),
        "loss_token_ratio": totals["loss_tokens_target"] / max(totals["loss_tokens_source"], 1),
        "source_model": source_manifest.model["name"],
        "target_model": target.name,
    }
    io.write_json_atomic(job.out / schema.STATS, stats)
    return {"model": target.entry(), "stats": stats}


SHARDS = Shards(plan=plan, output=lambda part: part.name, work=work, worker=Retokenizer, reduce=reduce)


class RetokenizeResult(Pruned):
    pass


def summary(m: RetokenizeResult) -> list:
    st = m.stats
    return [
        f"re-tokenised {st['samples']:,} samples for {st['target_model']}: loss tokens {st['loss_tokens_source']:,} "
        f"-> {st['loss_tokens_target']:,}; kept loss characters carried over: {st['kept_chars_ratio']:.4f}; "
        f"data: {m.config['out']}/{schema.PRUNED_DATA}/train-*.parquet"
    ]


STAGE = register(
    Stage(
        name="retokenize",
        produces="pruned",
        config=RetokenizeConfig,
        doc="Carry a pruned dataset over to another model's tokenizer and chat template "
        "(score small, train any model).",
        shards=SHARDS,  # one per pruned data file, resumed per file by the executor
        identify=lambda job: identify_model(job, "target"),
        inputs=(
            Input("pruned", kind="pruned", hint="retokenize the output of `curate prune`"),
            Input("model", model=True),
        ),
        outputs=(f"{schema.PRUNED_DATA}/{schema.PRUNED_GLOB}", schema.STATS),
        needs=lambda cfg: ("transformers",),
        resumable=True,  # the files this run finished are kept
        result=RetokenizeResult,
        summary=summary,
        cli=Cli(arguments=("pruned",), first=("model", "out")),
    )
)
run = runner(STAGE)
