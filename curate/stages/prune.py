"""`curate prune`: place samples on the EU plane, keep an exact budget, mask noisy tokens.

Two passes so memory does not grow with the token count: pass 1 reads only per-sample statistics from every
scores shard (checking every value on the way); pass 2 rewrites one shard at a time with the loss masks of the
kept samples, in `--workers` processes when asked (the files are the same either way).
Output: `OUT/data/train-NNNNN-of-MMMMM.parquet` (schema.PRUNED), `OUT/samples.parquet` (every input sample,
its coordinates, quadrant and fate), `OUT/stats.json`, and `OUT/_manifest.json` last.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, io, pruning, schema, storage, strategies
from ..card import CARD, PICTURE, plane_picture, pruned_card, source_card
from ..config.prune import PruneConfig
from ..config.report import ReportConfig
from ..config.retokenize import RetokenizeConfig
from ..errors import CurateError
from ..executor import Job, runner
from ..formats import split_tools
from ..kinds import Pruned
from ..masking import WATCHED, mask_sample, needs_text
from ..registry import register
from ..stage import Cli, Input, Resources, Shards, Stage, Worker, in_fingerprint
from ..triage import collect_coordinates, mark_duplicates, score_files, select
from ..units import KINDS, WATCHED_NAMES
from ..verify import input_change
from ..wiring import TARGET

SCORES_HINT = "run `curate score` into it first"


# ---------------------------------------------------------------- pass 2: the masks


def text_view(model: dict, required: bool):
    """A TokenText for the scorer's tokenizer (one per process), or None when it cannot be loaded and whole
    units and protected spans were not asked for (then the summary has no kinds)."""
    key = model["path"]
    if key not in _TEXT_VIEWS:
        import warnings

        from ..models import load_tokenizer_from
        from ..tokenization import TokenText, ensure_chat_template

        try:
            # the scorer loaded it before, so it is on disk (a hub id in the local cache): never wait on a network
            tokenizer = load_tokenizer_from(model["path"], model["name"], local_files_only=True)
            with warnings.catch_warnings():  # score already warned about a missing chat template
                warnings.simplefilter("ignore")
                ensure_chat_template(tokenizer)
            _TEXT_VIEWS[key] = TokenText(tokenizer)
        except (CurateError, ImportError) as e:
            _TEXT_VIEWS[key] = e
    view = _TEXT_VIEWS[key]
    if isinstance(view, Exception):
        if required:
            raise CurateError(
                f"--token-unit word and --protect read the text of each token with the scorer's tokenizer, and "
                f"{model['name']!r} ({model['path']}) is neither a model folder here nor in the hub cache. Make it "
                "available, or prune per token: --token-unit token --protect none"
            ) from None
        return None
    return view


_TEXT_VIEWS: dict = {}


def prune_rows(
    rows: pa.Table, fate: dict[str, tuple], cfg: PruneConfig, model: dict, pruned: Collection[str]
) -> tuple[pa.Table, Counter]:
    """Pruned-schema table for the kept rows of one scores shard, and what token pruning did (with loss_tokens);
    `pruned`: the selections whose tokens are pruned."""
    cols = {name: [] for name in schema.PRUNED.names}
    effect = Counter()
    data = rows.to_pydict()
    view = None
    for i, sid in enumerate(data["id"]):
        if sid not in fate:
            continue
        quadrant, selection, ppl, ent = fate[sid]
        ids = np.asarray(data["input_ids"][i], dtype=np.int32)
        trainable = np.asarray(data["trainable"][i], dtype=np.int8)
        if selection in pruned and cfg.token_strategy != "none":
            view = view or text_view(model, needs_text(cfg)) or False
            spans = view.spans(data["messages"][i], ids) if view else None
            logprob = np.asarray(data["logprob"][i], dtype=np.float32)
            mask = mask_sample(logprob, trainable, data["truncated"][i], spans, sid, cfg, effect, cfg.seed)
        else:
            mask = trainable.copy()
        labels = np.where(mask == 1, ids, schema.IGNORE_INDEX).astype(np.int32)
        effect["loss_tokens"] += int(mask.sum())
        turns, tools = split_tools(data["messages"][i])
        for name, value in (
            ("id", sid),
            ("messages", turns),
            ("tools", tools),
            ("input_ids", ids),
            ("attention_mask", np.ones(len(ids), dtype=np.int8)),
            ("labels", labels),
            ("loss_mask", mask),
            ("assistant_masks", mask),
            ("quadrant", quadrant),
            ("selection", selection),
            ("ppl", ppl),
            ("ent", ent),
        ):
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=schema.PRUNED), effect


@dataclass(frozen=True)
class MaskShard:
    """Pass 2 for one scores shard: the pruned file it becomes and the fate of its kept samples."""

    index: int
    source: str  # the scores shard
    name: str  # the pruned shard, relative to OUT
    fate: dict  # id -> (quadrant, selection, ppl, ent) of its kept samples


@dataclass(frozen=True)
class MaskWork:
    cfg: PruneConfig
    model: dict
    # the selections whose tokens are pruned, as the strategy says in this process: a strategy registered from
    # Python is not registered in a worker process
    pruned: tuple[str, ...]


class MaskWriter(Worker):
    """Writes pruned shards (stateless, but for the tokenizer its text view loads once per process)."""

    def __init__(self, work: MaskWork, output, gpus: float = 0):
        self.work, self.output = work, output

    def run(self, shard: MaskShard, progress=lambda units, tokens=0: None) -> dict:
        w = self.work
        columns = ["id", "messages", "input_ids", "trainable", "logprob", "truncated"]
        table = pq.read_table(shard.source, columns=columns)
        pruned, effect = prune_rows(table, shard.fate, w.cfg, w.model, w.pruned)
        # the version is the table's own metadata, ahead of the executor's mark (as pruned files always had it); what
        # token pruning did travels with the shard: a resumed run adds up the shards it keeps from it
        pruned = pruned.replace_schema_metadata({"curate_version": __version__})
        self.output.write_parquet(shard.name, pruned, {"effect": json.dumps(effect)})
        return dict(effect)


def identify(job: Job) -> dict:
    """Checks before any work: the scored input unchanged, the grouping field carried by the scores."""
    cfg, scores_dir, scores = job.cfg, job.inputs["scores"], job.manifests["scores"]
    if changed := input_change(scores_dir, scores):
        if not cfg.allow_changed_input:
            raise CurateError(f"{changed}: score it again, or prune the old scores with --allow-changed-input")
        job.log(f"warning: {changed}; pruning the scores of the old rows (--allow-changed-input)")
    missing = [x for x in strategies.get(cfg.strategy).signals if x not in scores.signals]
    if missing:
        raise CurateError(
            f"--strategy {cfg.strategy} needs the scores' {', '.join(missing)} signal, and {scores_dir} has none: "
            f"score with --signals {','.join(missing)}"
        )
    if cfg.group_by and cfg.group_by not in scores.keep_fields:
        raise CurateError(
            f"--group-by {cfg.group_by}: the scores in {scores_dir} do not carry that field; score with "
            f"--keep-fields {cfg.group_by}"
        )
    return {}


def dataset_card(job: Job, stats: dict) -> str:
    """README.md: what `datasets.load_dataset(OUT)` and the Hub read, and where the data came from."""
    cfg, scores = job.cfg, job.manifests["scores"]
    defaults = PruneConfig.model_construct()
    changed = {
        k: v
        for k, v in cfg.model_dump(exclude={"scores", "out"}).items()
        if in_fingerprint(PruneConfig, k) and v != getattr(defaults, k, None)
    }
    source = scores.inputs[0]["path"] if scores.inputs else None
    inherited = source_card(storage.resolve(job.inputs["scores"], source)) if source else {}
    data = [job.entries[n] for n in sorted(job.entries) if n.startswith(f"{schema.PRUNED_DATA}/")]
    return pruned_card(stats, scores, changed, inherited, data)


def excluded_ids(job: Job, known: pl.Series) -> list[str]:
    """The ids of --exclude-ids: one per line, exactly as written (the explorer's download writes them so: an id
    may end in a space or start with `#`). Blank lines are skipped, and lines starting with `#` that are no id
    (comments); every other line must be one of `known` (the scored ids): a typo would otherwise exclude nothing,
    silently."""
    path = job.inputs.get("exclude_ids")
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte order mark is not part of an id
    except UnicodeDecodeError:
        raise CurateError(f"{path}: --exclude-ids must be UTF-8 text, one id per line") from None
    known = set(known.to_list())
    lines = [
        (n, line)
        for n, line in enumerate(text.splitlines(), 1)
        if line in known or (line.strip() and not line.startswith("#"))
    ]
    unknown = [(n, line) for n, line in lines if line not in known]
    if unknown:
        named = "; ".join(f"line {n}: {line!r}{near_id(line, known)}" for n, line in unknown[:20])
        more = f"; and {len(unknown) - 20:,} more" if len(unknown) > 20 else ""
        raise CurateError(
            f"{path}: {len(unknown):,} of its {len(lines):,} ids are not in {job.inputs['scores']} ({named}{more}); "
            "ids are read exactly, spaces included"
        )
    return [line for _, line in lines]


def near_id(line: str, known: set) -> str:
    """`(did you mean 'q1'?)` where a line is a known id but for spaces around it."""
    return f" (did you mean {line.strip()!r}?)" if line.strip() in known else ""


def plan(job: Job) -> list[MaskShard]:
    """Pass 1: place every sample and triage to the exact budget; the shards of pass 2 are the scores shards that
    hold a kept sample."""
    cfg, reporter = job.cfg, job.reporter
    scores_dir, scores = job.inputs["scores"], job.manifests["scores"]
    if scores.score_positions == "trainable" and cfg.entropy_positions == "all":
        raise CurateError(
            f"{scores_dir} holds scores of the trainable tokens only; --entropy-positions all needs the "
            "prompt's too: rescore with --positions all"
        )
    if needs_text(cfg):
        text_view(scores.model, required=True)  # a missing tokenizer stops the run before any work
    shards = score_files(scores_dir, scores)
    coords = collect_coordinates(shards, cfg, scores.vocab_size, scores.score_positions, scores.signals)
    if cfg.group_ratios:
        unknown = sorted(set(cfg.group_ratios) - set(coords["group"].unique().to_list()))
        if unknown:
            raise CurateError(
                f"--group-ratios names groups that no sample has in field {cfg.group_by!r}: {', '.join(unknown)} "
                f"(groups: {', '.join(sorted(coords['group'].unique().to_list())[:20])})"
            )
    coords = pruning.place(coords, cfg.placement)
    multi = int((coords["turn_ppl"].list.len() > 1).sum())
    if multi:
        reporter.log(f"{multi:,} multi-turn samples, placed on the plane by --placement {cfg.placement}")
    coords = mark_duplicates(coords.with_row_index("row"), cfg.keep_duplicates)
    coords = coords.with_columns(excluded=pl.col("id").is_in(excluded_ids(job, coords["id"])))
    left_out = pl.col("duplicate_of").is_not_null() | pl.col("excluded")
    if coords.filter(~left_out).is_empty():
        raise CurateError(f"{cfg.exclude_ids}: it excludes every sample of {scores_dir}; nothing is left to keep")
    chosen, summary = select(coords.filter(~left_out), cfg)
    copies = coords.filter(left_out)
    if copies.height:  # later copies of a conversation and excluded samples: the triage never saw them
        quadrant = pruning.quadrant_labels(copies["ppl"].to_numpy(), copies["ent"].to_numpy(), summary["medians"])
        copies = copies.with_columns(
            pl.Series("quadrant", quadrant), batch=pl.lit(-1, pl.Int64), selection=pl.lit(None, pl.String)
        )
        chosen = pl.concat([chosen, copies.select(chosen.columns)]).sort("row")
        duplicates, excluded = copies["duplicate_of"].is_not_null().sum(), copies["excluded"].sum()
        if duplicates:
            reporter.log(
                f"{duplicates:,} later copies of identical conversations left out (--keep-duplicates keeps them)"
            )
        if excluded:
            reporter.log(f"{excluded:,} samples left out as --exclude-ids asks")
    chosen = chosen.drop("row", "content_hash")
    kept = chosen.filter(pl.col("selection").is_not_null())
    kept_shards = sorted(set(kept["shard"].to_list()))
    reporter.log(f"EU plane: {coords.height:,} samples, keeping {kept.height:,}")
    names = [schema.pruned_shard(j, len(kept_shards)) for j in range(len(kept_shards))]
    job.context.update(chosen=chosen, summary=summary, names=names)
    shard_tasks = []
    for j, (name, shard) in enumerate(zip(names, kept_shards)):
        part = kept.filter(pl.col("shard") == shard).select("id", "quadrant", "selection", "ppl", "ent")
        fate = {r[0]: r[1:] for r in part.iter_rows()}
        shard_tasks.append(MaskShard(j, str(shards[shard]), name, fate))
    return shard_tasks


def reduce(job: Job, shard_tasks: list[MaskShard], results: dict, info: dict) -> dict:
    """What pass 2 did, over every shard (those of an earlier attempt read from their files), then samples.parquet,
    stats.json, the card and the picture; the manifest's fields."""
    cfg, out, reporter, scores = job.cfg, job.out, job.reporter, job.manifests["scores"]
    chosen, summary, names = job.context["chosen"], job.context["summary"], job.context["names"]
    effect = Counter()
    for shard in shard_tasks:
        done = results.get(shard.index)
        effect.update(done if done is not None else json.loads(io.parquet_metadata(out / shard.name)["effect"]))
    loss_tokens = effect.pop("loss_tokens", 0)
    for name in names:  # hashed once: for the card's identity and for the manifest
        job.entries[name] = io.file_entry(out, name)

    samples = chosen.with_columns(kept=pl.col("selection").is_not_null())
    samples.write_parquet(out / schema.SAMPLES)
    stats = build_stats(cfg, samples, summary, loss_tokens, effect)
    for line in effect_lines(stats["token_pruning"]):
        reporter.log(line)
    io.write_json_atomic(out / schema.STATS, stats)
    io.write_bytes_atomic(out / CARD, dataset_card(job, stats).encode())
    picture = plane_picture(samples["ppl"].to_numpy(), samples["ent"].to_numpy(), samples["selection"].to_list())
    io.write_bytes_atomic(out / PICTURE, picture)
    return {
        "model": scores.model,
        "counts": {"samples_in": samples.height, "samples_out": stats["K"], "dropped": samples.height - stats["K"]},
        "stats": stats,
    }


def pruned_selections(job: Job) -> tuple[str, ...]:
    """The selections of the kept samples whose tokens the strategy prunes (Q2 and fill-Q2 for Q-Tuning)."""
    strategy = strategies.get(job.cfg.strategy)
    kept = job.context["chosen"]["selection"].drop_nulls().unique().to_list()
    return tuple(sorted(label for label in kept if strategy.tokens_pruned(label)))


SHARDS = Shards(
    plan=plan,
    output=lambda shard: shard.name,
    work=lambda job: MaskWork(job.cfg, job.manifests["scores"].model, pruned_selections(job)),
    worker=MaskWriter,
    reduce=reduce,
    resources=lambda cfg: Resources(engine=cfg.engine, workers=cfg.workers, gpus_per_worker=0, address=cfg.address),
)


def rule_in_words(cfg: PruneConfig) -> str:
    """The token rule as a user should read it: which tokens leave the loss, and that `drop-high` means the ones
    the reference model finds most surprising."""
    what = "words and numbers" if cfg.token_unit == "word" else "tokens"
    if cfg.token_strategy == "random":
        how = f"random {what}"
    elif cfg.token_strategy == "ppl":
        how = f"the most surprising {what} (highest perplexity)"
    else:
        score = pruning.score_in_words(cfg.lam, cfg.token_score)
        if cfg.token_order == "drop-high":
            how = f"the most surprising {what} (highest {score})"
        else:
            how = f"the least surprising {what} (lowest {score}: what the model already predicts)"
    if cfg.token_budget == "turn":
        return (
            f"drop {how}, keep {cfg.token_ratio:g} of each assistant turn's prunable tokens (its protected spans "
            "and end-of-turn marker besides)"
        )
    return f"drop {how}, keep {cfg.token_ratio:g} of the trainable tokens (protected ones counted in it)"


def token_pruning_stats(cfg: PruneConfig, effect: Counter) -> dict:
    """What token pruning removed, from the per-sample counts of pass 2."""
    out = {
        "rule": rule_in_words(cfg),
        "unit": cfg.token_unit,
        "protect": list(cfg.protect) + ([cfg.protect_regex] if cfg.protect_regex else []),
        "samples": effect["samples"],
        "tokens_trainable": effect["tokens_trainable"],
        "tokens_kept": effect["tokens_kept"],
        # per sample max(k, tokens kept first: end of turn, protected spans); whole units may add fewer than one
        # unit's tokens on top of that
        "tokens_budget": effect["tokens_budget"],
        "tokens_over_budget": effect["tokens_kept"] - effect["tokens_budget"],
        "samples_over_budget": effect["samples_over_budget"],
        "tokens_protected": effect["tokens_protected"],
        "samples_without_text": effect["samples_without_text"],
        "budget": cfg.token_budget,
        "score": cfg.token_score,
        "lam": cfg.lam,
    }
    if effect["replies"]:  # what a user reads to know every reply is still taught (0 by construction per turn)
        out["protected_share"] = effect["tokens_protected"] / max(1, effect["tokens_trainable"])
        out["replies"] = effect["replies"]
        out["replies_without_content"] = effect["replies_without_content"]
    if any(effect[f"masked_{k}"] for k in KINDS) or effect["samples_with_final-answer"]:
        out["masked_by_kind"] = {k: effect[f"masked_{k}"] for k in KINDS}
        for name in WATCHED:
            out[name] = {
                "samples_with": effect[f"samples_with_{name}"],
                "samples_lost_part": effect[f"samples_lost_part_of_{name}"],
            }
    return out


def effect_lines(tp: dict) -> list[str]:
    """The summary of token pruning for the terminal: the rule, in plain words, and what it took out."""
    if not tp["samples"]:
        return []
    masked = tp["tokens_trainable"] - tp["tokens_kept"]
    lines = [
        f"token pruning: {tp['rule']}; protected: {', '.join(tp['protect']) or 'nothing'}",
        f"  {tp['samples']:,} sample{'' if tp['samples'] == 1 else 's'} pruned: {masked:,} of "
        f"{tp['tokens_trainable']:,} tokens out of the loss "
        f"({tp['tokens_over_budget']:,} kept above the budget to keep words whole)",
    ]
    if "masked_by_kind" in tp:
        kinds = tp["masked_by_kind"]
        lines.append(
            f"  masked: {kinds['digits']:,} digit, {kinds['words']:,} word and {kinds['punctuation']:,} "
            "punctuation/markup tokens"
        )
        for name in WATCHED:
            if tp[name]["samples_with"]:
                lines.append(
                    f"  {tp[name]['samples_lost_part']:,} of {tp[name]['samples_with']:,} pruned samples with a "
                    f"{WATCHED_NAMES[name]} lost part of it"
                )
    if "replies" in tp:
        lines.append(
            f"  {tp['replies_without_content']:,} of {tp['replies']:,} replies train no word or number "
            f"({tp['protected_share']:.0%} of the pruned samples' tokens are protected or end a turn; "
            f"budget per {tp['budget']})"
        )
    if tp["samples_without_text"]:
        lines.append(f"  {tp['samples_without_text']:,} samples kept whole: their tokens' text could not be recovered")
    return lines


def build_stats(cfg: PruneConfig, samples: pl.DataFrame, summary: dict, loss_tokens: int, effect: Counter) -> dict:
    kept = samples.filter(pl.col("kept"))
    trainable_all = int(samples["n_trainable"].sum())
    trainable_kept = int(kept["n_trainable"].sum())
    quadrants = Counter(samples["quadrant"].to_list())
    kept_quadrants = Counter(kept["quadrant"].to_list())
    stats = {
        "N": samples.height,
        "K": kept.height,
        **summary,
        "quadrants": {q: quadrants.get(q, 0) for q in schema.QUADRANTS},
        "kept_by_quadrant": {q: kept_quadrants.get(q, 0) for q in schema.QUADRANTS},
        "selection": dict(sorted(Counter(kept["selection"].to_list()).items())),
        "trainable_tokens": {"all_samples": trainable_all, "kept_samples": trainable_kept, "after": loss_tokens},
        "sample_ratio": kept.height / samples.height,
        "loss_token_ratio": loss_tokens / trainable_all if trainable_all else 0.0,
        "loss_token_ratio_in_kept": loss_tokens / trainable_kept if trainable_kept else 0.0,
        "duplicates_left_out": int(samples["duplicate_of"].is_not_null().sum()),
        "excluded": int(samples["excluded"].sum()),
        "placement": cfg.placement,
        "multi_turn_samples": int((samples["turn_ppl"].list.len() > 1).sum()),
        "token_pruning": token_pruning_stats(cfg, effect),
        "config": cfg.model_dump(),
    }
    if cfg.preset:
        stats["preset"] = {"name": cfg.preset, "replaced": preset_replaced(stats["config"])}
    if "group" in samples.columns:
        # A later copy of a conversation counts in the group of its first copy (the smallest id), which takes part
        # in that group's triage; the copy's own group loses the row, and says so.
        first_group = dict(zip(samples["id"].to_list(), samples["group"].to_list()))
        copy = pl.col("duplicate_of").is_not_null()
        elsewhere = copy & (pl.col("duplicate_of").replace_strict(first_group, default=None) != pl.col("group"))
        per = (
            samples.group_by("group")
            .agg(N=pl.len(), K=pl.col("kept").sum(), copies=copy.sum(), elsewhere=elsewhere.sum())
            .sort("group")
        )
        stats["groups"] = {
            g: {
                "N": n,
                "K": k,
                "ratio": cfg.group_ratios.get(g, cfg.ratio),
                "duplicates_left_out": copies,
                "duplicates_of_other_groups": other,
            }
            for g, n, k, copies, other in per.iter_rows()
        }
    return stats


def preset_replaced(config: dict) -> dict:
    """The settings of --preset that options given beside it replaced (they win): {option: the preset's value}."""
    from ..arms import PRESETS

    return {k: v for k, v in PRESETS[config["preset"]].items() if config[k] != v}


def preset_lines(config: dict) -> list[str]:
    """With --preset: the settings it stands for as they were used, and the preset's values that were replaced."""
    if not config.get("preset"):
        return []
    from ..arms import PRESETS
    from ..card import command_line

    def flags(options: dict) -> str:
        return command_line("", options).removeprefix("curate prune ").strip()

    line = f"preset {config['preset']}: {flags({k: config[k] for k in PRESETS[config['preset']]})}"
    if replaced := preset_replaced(config):
        line += f" (given beside it, in place of the preset's {flags(replaced)})"
    return [line]


class PruneResult(Pruned):
    counts: dict[str, int]


def summary(m: PruneResult) -> list:
    from rich.table import Table

    st = m.stats
    t = Table(title=f"EU plane and pruning: {m.config['out']}")
    for col in ("quadrant", "meaning", "samples", "kept"):
        t.add_column(col, justify="right" if col in ("samples", "kept") else "left")
    for q in schema.QUADRANTS:
        t.add_row(
            q,
            f"{schema.QUADRANT_NAMES[q]} ({schema.QUADRANT_AXES[q]})",
            f"{st['quadrants'][q]:,}",
            f"{st['kept_by_quadrant'][q]:,}",
        )
    lines: list = [t, f"medians: ppl {st['medians']['ppl']:.3f}, entropy {st['medians']['ent']:.3f}"]
    if st.get("thresholds"):
        th = st["thresholds"]
        lines.append(
            f"alpha {th['alpha']:.4f}: Q2 = ppl > {th['ppl_high']:.3f} and ent <= {th['ent_low']:.3f}; "
            f"Q4 = ppl <= {th['ppl_low']:.3f} and ent > {th['ent_high']:.3f}"
        )
    elif st.get("alpha_per_batch"):
        a = st["alpha_per_batch"]
        lines.append(f"alpha per batch or group: min {a['min']:.3f}, mean {a['mean']:.3f}, max {a['max']:.3f}")
    for g, v in (st.get("groups") or {}).items():
        line = f"group {g}: kept {v['K']:,} of {v['N']:,} (ratio {v['ratio']})"
        if v.get("duplicates_left_out"):
            line += (
                f"; {v['duplicates_left_out']:,} of its rows are later copies of identical conversations, left out "
                f"({v['duplicates_of_other_groups']:,} of them count in the group of their first copy)"
            )
        lines.append(line)
    lines += preset_lines(m.config)
    notes = st.get("strategy_notes") or {}
    if notes.get("kept_with_ifd_at_least_1"):
        lines.append(
            f"only {notes['ifd_below_1']:,} samples have IFD < 1: {notes['kept_with_ifd_at_least_1']:,} with IFD >= 1 "
            "(misaligned, by Cherry's rule) were kept to fill the budget"
        )
    tok = st["trainable_tokens"]
    lines += [
        f"kept {st['K']:,} of {st['N']:,} samples ({st['sample_ratio']:.1%}): {st['selection']}",
        f"loss tokens: {tok['after']:,} of {tok['all_samples']:,} trainable ({st['loss_token_ratio']:.1%}; "
        f"{st['loss_token_ratio_in_kept']:.1%} of the kept samples' {tok['kept_samples']:,})",
        f"pruned data: {storage.join(m.config['out'], schema.PRUNED_DATA, schema.PRUNED_GLOB)}",
    ]
    if m.config.get("target_model"):
        target = storage.join(m.config["out"], TARGET, schema.PRUNED_DATA, schema.PRUNED_GLOB)
        lines.append(f"for {m.config['target_model']}: {target}")
    if m.config.get("report"):
        lines.append(f"report: {storage.join(m.config['out'], 'report', 'report.html')}")
    return lines


def follow_ups(cfg: PruneConfig) -> list:
    """With --target-model, the kept samples in the target's tokens (OUT/target); with --report, the report."""
    steps = []
    if cfg.target_model:
        steps.append(
            ("retokenize", RetokenizeConfig(pruned=cfg.out, model=cfg.target_model, out=storage.join(cfg.out, TARGET)))
        )
    if cfg.report:
        steps.append(("report", ReportConfig(run=cfg.out)))
    return steps


STAGE = register(
    Stage(
        name="prune",
        produces="pruned",
        config=PruneConfig,
        doc="Keep the valuable samples (Q2, Q4) to an exact budget and mask noisy tokens in Q2 samples.",
        shards=SHARDS,  # pass 2, resumed per shard, in local processes or on Ray (--workers, --engine)
        identify=identify,
        inputs=(
            Input("scores", kind="scores", hint=SCORES_HINT),
            Input("exclude_ids", data=True, hint="the ids to leave out"),
            Input("target_model", model=True),  # `retokenize` identifies it (OUT/target)
        ),
        outputs=(f"{schema.PRUNED_DATA}/{schema.PRUNED_GLOB}", schema.SAMPLES, schema.STATS, CARD, PICTURE),
        needs=lambda cfg: ("ray",) if cfg.engine == "ray" else (),
        resumable=True,  # pruned shards this run finished are kept
        expensive=True,  # a pruned folder of other settings may be what a model was trained on: --force replaces it
        then=follow_ups,
        result=PruneResult,
        summary=summary,
        cli=Cli(arguments=("scores",)),
    )
)
run = runner(STAGE)
