"""One sample's loss mask under a token rule, and what it removed: the same code for `curate prune` (a data set's
kept samples) and the in-trainer loss (`curate.dynamic`, each micro-batch's). Pure: numpy in, numpy out.

The text of the tokens (for whole-word units and protected spans) comes from the caller: prune renders each
conversation with the scorer's tokenizer (`tokenization.TokenText`), the trainer decodes the ids it trains on
(`ids_view`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import pruning
from .config.selection import SelectionOptions
from .errors import CurateError
from .units import KINDS, REGEX_TIMEOUT_S, RegexTimeout, protected_spans, token_kinds, tokens_touching, unit_ids

WATCHED = ("final-answer", "tool-calls")  # spans the summary reports on, protected or not


def needs_text(cfg: SelectionOptions) -> bool:
    return cfg.token_strategy != "none" and (cfg.token_unit == "word" or bool(cfg.protect) or bool(cfg.protect_regex))


def mask_sample(
    logprob: np.ndarray,
    trainable: np.ndarray,
    truncated: bool,
    view: tuple | None,
    sid: str,
    cfg: SelectionOptions,
    effect: Counter,
    seed: int = 0,
) -> np.ndarray:
    """The loss mask of one sample whose tokens are pruned by `cfg`'s token rule, and what it removed (added to
    `effect`). `view`: (text, starts, ends, assistant contents) of its tokens, or None where the text is unknown;
    `seed`: the run's seed, from which random token pruning draws per sample (by `sid`)."""
    units = protect = None
    spans: list = []
    if view is not None:
        text, starts, ends, contents = view
        if cfg.token_unit == "word":
            units = unit_ids(text, starts, ends, trainable)
        # one scan finds the protected spans and the ones the summary reports on (final answers, tool calls)
        presets = tuple(dict.fromkeys([*cfg.protect, *WATCHED]))
        try:
            spans = protected_spans(text, contents, presets, (cfg.protect_regex,) if cfg.protect_regex else ())
        except RegexTimeout:
            raise CurateError(
                f"--protect-regex {cfg.protect_regex!r} ran over {REGEX_TIMEOUT_S:g} s on sample {sid!r} (it "
                "backtracks without end on that text); simplify the pattern (no nested repeats such as (a|aa)+)"
            ) from None
        kept_whole = [sp for sp in spans if sp[2] in cfg.protect or sp[2] == cfg.protect_regex]
        protect = tokens_touching(starts, ends, kept_whole) if kept_whole else None
    elif needs_text(cfg):
        # The tokenizer no longer renders this conversation into the scored ids: without the text, no unit or
        # protected span can be trusted, so the sample keeps every token (counted).
        effect["samples_without_text"] += 1
        return trainable.copy()
    kinds = token_kinds(view[0], view[1], view[2]) if view is not None else None
    content = kinds < 2 if kinds is not None else None  # a token covering a digit or a letter
    mask = pruning.token_keep_mask(
        logprob,
        trainable,
        truncated=truncated,
        token_ratio=cfg.token_ratio,
        lam=cfg.lam,
        order=cfg.token_order,
        strategy=cfg.token_strategy,
        seed=pruning.sample_seed(seed, sid),
        units=units,
        protect=protect,
        budget_scope=cfg.token_budget,
        scale=cfg.token_score,
        content=content,
    )
    masked = (trainable == 1) & (mask == 0)
    n_t = int(trainable.sum())
    own = np.where(trainable == 1, np.arange(len(trainable)), -1)
    first = pruning.kept_first(trainable, truncated, own if units is None else units, protect)
    floor = pruning.budget_floor(trainable, first, cfg.token_ratio, cfg.token_budget)  # what the rule must keep
    effect["samples"] += 1
    effect["tokens_trainable"] += n_t
    effect["tokens_kept"] += int(mask.sum())
    effect["tokens_budget"] += floor
    effect["samples_over_budget"] += int(mask.sum() > floor)
    if view is not None:
        text, starts, ends, contents = view
        for i, kind in enumerate(KINDS):
            effect[f"masked_{kind}"] += int((kinds[masked] == i).sum())
        effect["tokens_protected"] += int(first.sum())
        # replies: turns with a word or number outside their protected spans; which of them train none of it
        turn = pruning.turn_index(trainable)
        free_content = content & (trainable == 1) & ~first
        turns_with = np.unique(turn[free_content])
        effect["replies"] += len(turns_with)
        effect["replies_without_content"] += len(np.setdiff1d(turns_with, turn[free_content & (mask == 1)]))
        for name in WATCHED:
            found = [sp for sp in spans if sp[2] == name]
            if found:
                effect[f"samples_with_{name}"] += 1
                effect[f"samples_lost_part_of_{name}"] += int(tokens_touching(starts, ends, found)[masked].any())
    return mask


def ids_view(pieces: list[str], trainable: np.ndarray) -> tuple:
    """(text, starts, ends, assistant contents) from each token's own text (`pieces`, aligned with the ids): the view
    a trainer has, which sees ids and labels, not the conversation. The contents are the runs of trainable tokens; a
    newline stands between two runs so that no word joins across a prompt it does not see."""
    t = np.asarray(trainable, dtype=bool)
    parts, starts, ends, contents, at, run = [], [], [], [], 0, None
    for i, piece in enumerate(pieces):
        if not t[i]:
            piece = ""
            if run is not None:
                contents.append((run, at))
                parts.append("\n")
                at, run = at + 1, None
        elif run is None:
            run = at
        starts.append(at)
        parts.append(piece)
        at += len(piece)
        ends.append(at)
    if run is not None:
        contents.append((run, at))
    return "".join(parts), np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), contents
