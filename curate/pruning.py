"""The Q-Tuning maths, pure: EU-plane coordinates, sample triage to an exact budget, token masks.

Numpy/Polars in, numpy/Polars out, no I/O. docs/algorithm.md is the specification; comments name the
places where we deliberately differ from the paper's code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from .schema import ENTROPY_SLACK, LOGPROB_SLACK

if TYPE_CHECKING:  # the EU-plane functions use polars, imported when called: scoring needs none
    import polars as pl

TOKEN_STRATEGIES = ("qtuning", "random", "ppl", "none")
BISECT_STEPS = 60  # alpha in [0, 0.5]; 60 halvings reach float64 resolution


def budget(ratio: float, n: int) -> int:
    """K = max(1, round(ratio * n)), rounding halves up (0.5 -> 1), never more than n."""
    return min(n, max(1, math.floor(ratio * n + 0.5)))


# ---------------------------------------------------------------- EU plane


def sample_coordinates(
    scores: pl.DataFrame,
    entropy_positions: str = "response",
    vocab_size: int | None = None,
    scored_positions: str = "all",
) -> pl.DataFrame:
    """Per sample: `ppl` = exp(mean -logprob over trainable tokens), `ent` = mean entropy, and `problem`.

    `scores` has the columns id, n_tokens and the lists trainable, logprob, entropy. With
    entropy_positions="all" the entropy mean runs over every scored position, prompt included (the official
    code's choice). `problem` names what is impossible about a sample's scores (null when nothing is):
    ragged or null lists, non-finite values, log-probs above 0, entropies outside [0, log vocab_size].
    Position 0 is NaN by definition and is not checked, nor are the prompt's positions when the scores cover only
    the trainable ones (`scored_positions="trainable"`). Returns id, ppl, ent, n_trainable, problem, and per
    assistant turn the lists turn_ppl and turn_ent (`turn_coordinates`).
    """
    import polars as pl

    lens = [pl.col(c).list.len() for c in ("trainable", "logprob", "entropy")]
    ragged = pl.any_horizontal([n.is_null() | (n != pl.col("n_tokens")) for n in lens]) | pl.col("id").is_null()
    checked = scores.select("id", "n_tokens", "trainable", "logprob", "entropy").with_columns(ragged=ragged)
    broken = checked.filter(pl.col("ragged")).select(
        "id",
        ppl=pl.lit(None, pl.Float64),
        ent=pl.lit(None, pl.Float64),
        n_trainable=pl.lit(0, pl.Int64),
        problem=pl.lit("has null or ragged lists (lengths differ from n_tokens)"),
    )
    tokens = (
        checked.filter(~pl.col("ragged"))
        .with_columns(pos=pl.int_ranges(0, pl.col("trainable").list.len()))
        .explode("trainable", "logprob", "entropy", "pos")
    )
    train = pl.col("trainable") == 1
    scored = (pl.col("pos") > 0) & (train if scored_positions == "trainable" else True)  # 0 has no prediction
    ent_mask = train if entropy_positions == "response" else scored
    lp, en = pl.col("logprob").cast(pl.Float64), pl.col("entropy").cast(pl.Float64)
    top = math.log(vocab_size) + ENTROPY_SLACK if vocab_size else math.inf
    not_finite = scored & (~lp.is_finite() | ~en.is_finite()).fill_null(True)
    coords = (
        tokens.group_by("id", maintain_order=True)
        .agg(
            nll=(-lp).filter(train).mean(),
            ent=en.filter(ent_mask).mean(),
            n_trainable=train.sum().cast(pl.Int64),
            not_finite=not_finite.sum(),
            above_zero=(scored & (lp > LOGPROB_SLACK)).sum(),
            bad_entropy=(scored & ((en < -ENTROPY_SLACK) | (en > top))).sum(),
            bad_mask=(~pl.col("trainable").is_in([0, 1])).fill_null(True).sum(),
        )
        .with_columns(
            ppl=pl.col("nll").exp(),
            problem=pl.when(pl.col("not_finite") > 0)
            .then(pl.lit("has NaN scores (or other non-finite values)"))
            .when(pl.col("above_zero") > 0)
            .then(pl.lit("has log-probs above 0"))
            .when(pl.col("bad_entropy") > 0)
            .then(pl.lit(f"has entropies outside [0, log V = {top:.3f}]"))
            .when(pl.col("bad_mask") > 0)
            .then(pl.lit("has a trainable mask that is not 0/1"))
            .when(pl.col("n_trainable") == 0)
            .then(pl.lit("has no trainable token")),
        )
        .select("id", "ppl", "ent", "n_trainable", "problem")
    )
    coords = coords.join(turn_coordinates(tokens), on="id", how="left", maintain_order="left")
    return pl.concat([coords, broken], how="diagonal_relaxed") if broken.height else coords


def turn_coordinates(tokens: pl.DataFrame) -> pl.DataFrame:
    """Per sample, lists over its assistant turns (each maximal run of trainable tokens, in order): `turn_ppl`
    (exp of the turn's mean -logprob) and `turn_ent` (its mean entropy), from the exploded token frame."""
    import polars as pl

    train = pl.col("trainable") == 1
    starts = train & ~(pl.col("trainable").shift(1).over("id") == 1).fill_null(False)
    return (
        tokens.with_columns(turn=starts.cast(pl.Int32).cum_sum().over("id"))
        .filter(train)
        .group_by("id", "turn", maintain_order=True)
        .agg(
            turn_ppl=(-pl.col("logprob").cast(pl.Float64)).mean().exp(),
            turn_ent=pl.col("entropy").cast(pl.Float64).mean(),
        )
        .group_by("id", maintain_order=True)
        .agg("turn_ppl", "turn_ent")
    )


PLACEMENTS = ("conversation", "worst-turn", "max-turn")


def place(coords: pl.DataFrame, placement: str) -> pl.DataFrame:
    """The (ppl, ent) the triage uses for each sample (docs/algorithm.md, "Placing a conversation").

    conversation: the mean over all assistant tokens (the paper). worst-turn: the coordinates of the assistant turn
    with the highest perplexity. max-turn: each coordinate is its largest value over the assistant turns, so a
    conversation is as wrong as its most wrong turn and as uncertain as its most uncertain one: tool-call turns,
    whose JSON the schema makes predictable (entropy near 0), neither average a wrong reply away nor make a
    conversation with a confidently wrong call look certain. A sample with one turn keeps its conversation values,
    bit for bit, under every rule.
    """
    import polars as pl

    if placement == "conversation":
        return coords
    multi = pl.col("turn_ppl").list.len() > 1
    if placement == "worst-turn":
        worst = pl.col("turn_ppl").list.arg_max()
        ppl, ent = pl.col("turn_ppl").list.get(worst), pl.col("turn_ent").list.get(worst)
    else:
        ppl, ent = pl.col("turn_ppl").list.max(), pl.col("turn_ent").list.max()
    return coords.with_columns(
        ppl=pl.when(multi).then(ppl).otherwise(pl.col("ppl")), ent=pl.when(multi).then(ent).otherwise(pl.col("ent"))
    )


def linear_quantile(sorted_x: np.ndarray, q: float) -> float:
    """The q-quantile with linear interpolation (numpy's and polars' default definition), for display."""
    h = (len(sorted_x) - 1) * q
    lo = math.floor(h)
    if lo + 1 >= len(sorted_x):
        return float(sorted_x[lo])
    return float(sorted_x[lo]) + (h - lo) * (float(sorted_x[lo + 1]) - float(sorted_x[lo]))


def medians(ppl: np.ndarray, ent: np.ndarray) -> dict[str, float]:
    return {"ppl": linear_quantile(np.sort(ppl), 0.5), "ent": linear_quantile(np.sort(ent), 0.5)}


def quadrant_labels(ppl: np.ndarray, ent: np.ndarray, median: dict[str, float]) -> np.ndarray:
    """Median-split diagnostic label: Q1 high/high, Q2 high ppl/low ent, Q3 low/low, Q4 low ppl/high ent."""
    hi_p = ppl > median["ppl"]
    hi_e = ent > median["ent"]
    return np.where(hi_p, np.where(hi_e, "Q1", "Q2"), np.where(hi_e, "Q4", "Q3"))


# ---------------------------------------------------------------- sample triage


@dataclass(frozen=True)
class Triage:
    selection: np.ndarray  # object array: "Q2", "Q4", "fill-Q2", "fill-Q4" or a strategy's name; None: dropped
    alpha: float | None
    thresholds: dict[str, float]
    notes: dict = field(default_factory=dict)  # what a strategy has to say about its choice (counts, for stats)


def _thresholds(sorted_ppl, sorted_ent, alpha) -> dict[str, float]:
    return {
        "alpha": alpha,
        "ppl_high": linear_quantile(sorted_ppl, 1 - alpha),
        "ent_low": linear_quantile(sorted_ent, alpha),
        "ppl_low": linear_quantile(sorted_ppl, alpha),
        "ent_high": linear_quantile(sorted_ent, 1 - alpha),
    }


def order_index(n: int, q: Fraction) -> int:
    """floor((n - 1) * q), in exact arithmetic.

    For a sample value x and the linearly interpolated quantile t = x_(i) + f (x_(i+1) - x_(i)), i = floor(h),
    h = (n - 1) q: no sample value lies strictly between x_(i) and x_(i+1), so x > t exactly when x > x_(i),
    and x <= t exactly when x <= x_(i). Membership then depends on ranks alone: the triage is invariant to any
    monotone rescaling, and no float rounding of t at the bisection limit decides a sample's fate.
    """
    return math.floor((n - 1) * q)


def _regions(ppl, ent, sorted_ppl, sorted_ent, alpha: float):
    """Q2(alpha) = ppl > q_ppl(1 - alpha) and ent <= q_ent(alpha); Q4(alpha) = ppl <= q_ppl(alpha) and
    ent > q_ent(1 - alpha), decided exactly (see order_index)."""
    a, n = Fraction(alpha), len(ppl)
    hi, lo = order_index(n, 1 - a), order_index(n, a)
    q2 = (ppl > sorted_ppl[hi]) & (ent <= sorted_ent[lo])
    q4 = (ppl <= sorted_ppl[lo]) & (ent > sorted_ent[hi])
    return q2, q4


def minmax(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min), 0 everywhere when all values are equal (the official code's normalisation)."""
    span = x.max() - x.min()
    return np.zeros_like(x, dtype=np.float64) if span == 0 else (x - x.min()) / span


def percentile_ranks(x: np.ndarray) -> np.ndarray:
    """Average rank among ties, counted from 0, divided by N - 1 (0 when N = 1): values in [0, 1].

    Invariant to any monotone rescaling of x, and one outlier moves no other sample's value.
    """
    n = len(x)
    if n <= 1:
        return np.zeros(n)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)  # exclusive
    ranks = np.empty(n)
    ranks[order] = ((starts + ends - 1) / 2.0)[np.cumsum(first) - 1]
    return ranks / (n - 1)


FILL_SCALES = {"rank": percentile_ranks, "minmax": minmax}


def qtuning_triage(ids: np.ndarray, ppl: np.ndarray, ent: np.ndarray, k: int, fill: str = "rank") -> Triage:
    """Exactly k samples: the largest alpha whose Q2 u Q4 fits in k, then a deterministic fill.

    The official code bisects alpha and beta together and returns its last iterate, which can overshoot
    the budget; we keep the largest feasible alpha and fill the rest, so the count is exact. The fill ranks
    the free samples by |ppl_r - ent_r| on percentile ranks (`fill="rank"`, default) or on min-max values
    (`fill="minmax"`, the official code's `wise_score`, where one heavy-tailed ppl outlier squeezes every
    other sample's ppl towards 0 and then looks like calibration data).
    """
    n = len(ids)
    sp, se = np.sort(ppl), np.sort(ent)

    def kept(alpha):
        a, b = _regions(ppl, ent, sp, se, alpha)
        return int(a.sum() + b.sum())

    lo, hi = 0.0, 0.5
    if kept(hi) <= k:
        lo = hi
    else:
        for _ in range(BISECT_STEPS):
            mid = (lo + hi) / 2
            if kept(mid) <= k:
                lo = mid
            else:
                hi = mid
    thresholds = _thresholds(sp, se, lo)
    q2, q4 = _regions(ppl, ent, sp, se, lo)
    selection = np.full(n, None, dtype=object)
    selection[q2] = "Q2"
    selection[q4] = "Q4"
    remaining = k - int(q2.sum() + q4.sum())
    if remaining > 0:
        scale = FILL_SCALES[fill]
        ppl_n, ent_n = scale(ppl), scale(ent)
        gap = np.abs(ppl_n - ent_n)
        free = np.flatnonzero(selection == None)  # noqa: E711 (elementwise on an object array)
        # largest gap first, ties by id (lexsort: last key is primary)
        order = free[np.lexsort((ids[free], -gap[free]))][:remaining]
        selection[order] = np.where(ppl_n[order] >= ent_n[order], "fill-Q2", "fill-Q4")
    return Triage(selection, lo, thresholds)


def unique_in_order(values: np.ndarray) -> list:
    return list(dict.fromkeys(values.tolist()))


def codes(values: np.ndarray) -> np.ndarray:
    """An int64 code per value, numbered in order of first appearance."""
    index = {v: i for i, v in enumerate(unique_in_order(values))}
    return np.fromiter((index[v] for v in values.tolist()), dtype=np.int64, count=len(values))


def split_budget(k: int, sizes: np.ndarray) -> np.ndarray:
    """K split over batches in proportion to their sizes by largest remainder (ties: the earlier batch), so
    the batches of a scope keep exactly K together, as one global triage would; no batch gets more than its size.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    share, remainder = np.divmod(k * sizes, n)
    extra = np.lexsort((np.arange(len(sizes)), -remainder))[: k - int(share.sum())]
    share[extra] += 1
    return share


def batch_assignment(n: int, batch_size: int, seed: int) -> np.ndarray:
    """Batch number per sample for `batch` scope: a seeded shuffle cut into batches of batch_size."""
    order = np.random.default_rng(seed).permutation(n)
    batch = np.empty(n, dtype=np.int64)
    batch[order] = np.arange(n) // batch_size
    return batch


# ---------------------------------------------------------------- token pruning


def protected_positions(trainable: np.ndarray, truncated: bool) -> np.ndarray:
    """End-of-turn tokens: the last token of each trainable span (our masks end each assistant turn with it).

    A span cut by truncation ends mid-turn and has no end-of-turn token to protect.
    """
    t = trainable.astype(bool)
    nxt = np.append(t[1:], False)
    last = t & ~nxt
    if truncated and t[-1]:
        last[-1] = False
    return last


TOKEN_SCALES = ("ppl", "nll")


def score_in_words(lam: float, scale: str) -> str:
    """The token score as a reader should name it: a token's own perplexity (or NLL) at lam 0, else context-aware."""
    x = "perplexity" if scale == "ppl" else "NLL"
    return x if lam == 0 else f"context-aware {x}, lam {lam:g}"


def context_scores(logprob: np.ndarray, trainable: np.ndarray, lam: float, scale: str = "ppl") -> np.ndarray:
    """s[i] = (1 - lam) * x_i + lam * (x_{i-1} + x_{i+1}); non-trainable neighbours count 0.

    x is the token's perplexity exp(-logprob) (`scale="ppl"`, the paper's formula), in float64 (float32 overflows
    for logprob < -88), or its negative log-prob (`scale="nll"`), on which one surprising neighbour moves a
    token's score by its NLL, not by its exponential.
    """
    t = trainable.astype(bool)
    nll = -logprob.astype(np.float64)
    tok = np.where(t, np.exp(np.minimum(nll, 700.0)) if scale == "ppl" else nll, 0.0)
    left = np.concatenate([[0.0], tok[:-1]])
    right = np.concatenate([tok[1:], [0.0]])
    return np.where(t, (1 - lam) * tok + lam * (left + right), 0.0)


def kept_first(trainable: np.ndarray, truncated: bool, units: np.ndarray, protect: np.ndarray | None) -> np.ndarray:
    """bool per position: the tokens token pruning keeps before any other: end-of-turn tokens, `protect`ed tokens,
    and every token of a unit that holds a protected one (a unit is never split)."""
    t = trainable.astype(bool)
    protected = protected_positions(trainable, truncated)
    if protect is not None:
        protected |= t & np.asarray(protect, dtype=bool)
        protected |= t & np.isin(units, units[protected & t])
    return protected


def turn_index(trainable: np.ndarray) -> np.ndarray:
    """int64 per position: the assistant turn (maximal run of trainable tokens, counted from 0) it belongs to;
    -1 outside the turns."""
    t = trainable.astype(bool)
    starts = t & ~np.concatenate([[False], t[:-1]])
    return np.where(t, np.cumsum(starts) - 1, -1)


TOKEN_BUDGETS = ("turn", "sample")


def token_keep_mask(
    logprob: np.ndarray,
    trainable: np.ndarray,
    *,
    truncated: bool = False,
    token_ratio: float,
    lam: float,
    order: str = "drop-high",
    strategy: str = "qtuning",
    seed: int = 0,
    units: np.ndarray | None = None,
    protect: np.ndarray | None = None,
    budget_scope: str = "sample",
    scale: str = "ppl",
    content: np.ndarray | None = None,
) -> np.ndarray:
    """int8 mask over positions: 1 where the token stays in the loss.

    End-of-turn tokens and `protect`ed tokens are kept first (`kept_first`); the other trainable tokens are the
    prunable ones, kept or dropped by unit (`units`: a unit id per position, -1 where not trainable; None: every
    token is its own unit, the paper's rule). Units are ranked (lowest mean score first for drop-high, highest for
    drop-low, a seeded shuffle for random) and taken in that order while fewer than k tokens are kept, so the
    budget is met exactly, or exceeded by fewer than one unit's tokens:

    - `budget_scope="sample"` (the paper): k = max(1, round(ratio * |T|)) over all trainable tokens, the kept-first
      tokens counted in it, so protected spans use up the budget of the free text beside them.
    - `budget_scope="turn"`: per assistant turn, k = max(1, round(ratio * prunable tokens of the turn)) on top of its
      kept-first tokens (none for a turn with nothing prunable). `content` (bool per position: the token covers a
      letter or digit) then makes the turn's best-ranked unit holding content its first pick, so a reply never
      keeps only its punctuation.
    """
    t = trainable.astype(bool)
    keep = t.copy()
    n_train = int(t.sum())
    if strategy == "none" or n_train == 0:
        return keep.astype(np.int8)
    unit = np.where(t, np.arange(len(t)), -1) if units is None else np.asarray(units)
    protected = kept_first(trainable, truncated, unit, protect)
    candidates = np.flatnonzero(t & ~protected)
    keep[candidates] = False
    if not len(candidates):
        return keep.astype(np.int8)
    # candidate units, numbered in text order (a unit's tokens are consecutive)
    first = np.concatenate([[True], unit[candidates][1:] != unit[candidates][:-1]])
    member = np.cumsum(first) - 1
    sizes = np.bincount(member)
    if strategy == "random":
        ranked = np.random.default_rng(seed).permutation(len(sizes))
    else:
        s = context_scores(logprob, trainable, 0.0 if strategy == "ppl" else lam, scale)[candidates]
        unit_score = np.bincount(member, weights=s) / sizes
        # drop-high keeps the lowest scores; ties by position (stable sort)
        ranked = np.argsort(unit_score if order == "drop-high" else -unit_score, kind="stable")
    if budget_scope == "sample":
        group = np.zeros(len(sizes), dtype=np.int64)
        quota = np.array([max(0, budget(token_ratio, n_train) - int(protected.sum()))])
    else:
        group = turn_index(trainable)[candidates][first]
        prunable = np.bincount(group, weights=sizes).astype(np.int64)
        quota = np.array([budget(token_ratio, int(n)) if n else 0 for n in prunable])
        if content is not None and np.asarray(content, dtype=bool)[candidates].any():
            # each turn's best-ranked unit with a word or number in it goes first
            rank = np.empty(len(ranked), dtype=np.int64)
            rank[ranked] = np.arange(len(ranked))
            wordy = np.flatnonzero(np.bincount(member, weights=np.asarray(content, dtype=bool)[candidates]) > 0)
            by_turn = wordy[np.lexsort((rank[wordy], group[wordy]))]
            rank[by_turn[np.concatenate([[True], group[by_turn][1:] != group[by_turn][:-1]])]] = -1
            ranked = np.argsort(rank, kind="stable")
    chosen = take_units(ranked, sizes, group, quota)
    keep[candidates] = np.isin(member, chosen)
    return keep.astype(np.int8)


def budget_floor(trainable: np.ndarray, kept: np.ndarray, token_ratio: float, budget_scope: str) -> int:
    """The tokens `token_keep_mask` must keep at least, given the kept-first ones (`kept`): max(k, kept) over the
    sample, or per turn its kept-first tokens plus max(1, round(ratio * prunable)) when it has prunable ones."""
    t = trainable.astype(bool)
    if budget_scope == "sample":
        return max(budget(token_ratio, int(t.sum())), int(kept.sum()))
    turn = turn_index(trainable)
    prunable = np.bincount(turn[t & ~kept], minlength=int(turn.max()) + 1)
    return int(kept.sum()) + sum(budget(token_ratio, int(n)) for n in prunable if n)


def take_units(ranked: np.ndarray, sizes: np.ndarray, group: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """The units taken, in rank order within each group, while fewer than its quota of tokens are taken."""
    position = np.empty(len(ranked), dtype=np.int64)
    position[ranked] = np.arange(len(ranked))
    order = np.lexsort((position, group))  # by group, then by rank
    size = sizes[order]
    before = np.cumsum(size) - size  # tokens taken before each unit, counted over all groups
    starts = np.concatenate([[True], group[order][1:] != group[order][:-1]])
    before -= np.maximum.accumulate(np.where(starts, before, 0))  # ... and within its own group
    return order[before < quota[group[order]]]


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed so random token pruning does not depend on shard layout or order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little")
