"""The prune maths against a brute-force reading of docs/algorithm.md, plus invariants (hypothesis)."""

import math
from fractions import Fraction

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate import pruning
from curate.config import PruneConfig
from curate.triage import select

# ---------------------------------------------------------------- brute force, plain Python


def bf_quantile(values, q):
    """The linearly interpolated quantile, in exact rational arithmetic."""
    xs = [Fraction(v) for v in sorted(values)]
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] if lo + 1 >= len(xs) else xs[lo] + (h - lo) * (xs[lo + 1] - xs[lo])


def bf_regions(ppl, ent, a):
    a = Fraction(a)
    p_hi, e_lo, p_lo, e_hi = bf_quantile(ppl, 1 - a), bf_quantile(ent, a), bf_quantile(ppl, a), bf_quantile(ent, 1 - a)
    q2 = {i for i in range(len(ppl)) if ppl[i] > p_hi and ent[i] <= e_lo}
    q4 = {i for i in range(len(ppl)) if ppl[i] <= p_lo and ent[i] > e_hi}
    return q2, q4


def bf_rank(xs):
    """Percentile rank: (number of smaller values + (number of equal values - 1) / 2) / (N - 1); 0 when N = 1."""
    n = len(xs)
    if n == 1:
        return [0.0]
    return [(sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2) / (n - 1) for x in xs]


def bf_minmax(xs):
    lo_, hi_ = min(xs), max(xs)
    return [0.0 if hi_ == lo_ else (x - lo_) / (hi_ - lo_) for x in xs]


def bf_budget(ratio, n):
    return min(n, max(1, int(math.floor(ratio * n + 0.5))))


def bf_split(k, sizes):
    """Largest remainder, read literally: every batch its whole share, then one more to the largest fractions
    (exact, as Fractions), the earlier batch first."""
    from fractions import Fraction

    quotas = [Fraction(k * s, sum(sizes)) for s in sizes]
    shares = [math.floor(q) for q in quotas]
    for i in sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - shares[i]), i))[: k - sum(shares)]:
        shares[i] += 1
    return shares


def bf_triage(ids, ppl, ent, ratio, fill="rank", k=None):
    n = len(ids)
    k = bf_budget(ratio, n) if k is None else k
    if k == 0:
        return {}
    lo, hi = 0.0, 0.5
    if sum(map(len, bf_regions(ppl, ent, hi))) <= k:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(map(len, bf_regions(ppl, ent, mid))) <= k:
                lo = mid
            else:
                hi = mid
    q2, q4 = bf_regions(ppl, ent, lo)
    out = {ids[i]: "Q2" for i in q2} | {ids[i]: "Q4" for i in q4}

    norm = bf_rank if fill == "rank" else bf_minmax
    pn, en = norm(ppl), norm(ent)
    free = sorted((i for i in range(n) if ids[i] not in out), key=lambda i: (-abs(pn[i] - en[i]), ids[i]))
    for i in free[: k - len(out)]:
        out[ids[i]] = "fill-Q2" if pn[i] >= en[i] else "fill-Q4"
    return out


def coords_frame(ppl, ent):
    ids = [f"id{i:04d}" for i in range(len(ppl))]
    return pl.DataFrame({"id": ids, "ppl": ppl, "ent": ent, "n_trainable": [3] * len(ppl)})


def chosen(df):
    return {r["id"]: r["selection"] for r in df.iter_rows(named=True) if r["selection"] is not None}


values = st.lists(st.floats(0.5, 50, allow_nan=False), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), ratio=st.floats(0.01, 1.0), discrete=st.booleans(), fill=st.sampled_from(["rank", "minmax"]))
def test_global_triage_matches_brute_force(data, ratio, discrete, fill):
    n = data.draw(st.integers(1, 60))
    elems = st.sampled_from([1.0, 2.0, 3.0, 5.0]) if discrete else st.floats(0.5, 50, allow_nan=False)
    ppl = data.draw(st.lists(elems, min_size=n, max_size=n))
    ent = data.draw(st.lists(elems, min_size=n, max_size=n))
    df, _ = select(coords_frame(ppl, ent), PruneConfig(scores="", out="", ratio=ratio, fill=fill))
    got = chosen(df)
    assert got == bf_triage(df["id"].to_list(), ppl, ent, ratio, fill)
    assert len(got) == pruning.budget(ratio, n)


@settings(max_examples=100, deadline=None)
@given(
    ppl=st.lists(st.integers(50, 5000), min_size=2, max_size=40, unique=True),
    ent=st.lists(st.integers(100, 5000), min_size=2, max_size=40),
    ratio=st.floats(0.05, 1.0),
)
def test_rank_triage_is_invariant_to_monotone_rescaling(ppl, ent, ratio):
    n = min(len(ppl), len(ent))
    ppl, ent = [p / 100 for p in ppl[:n]], [e / 1000 for e in ent[:n]]  # apart enough for the warps to keep order
    base, _ = select(coords_frame(ppl, ent), PruneConfig(scores="", out="", ratio=ratio))
    warped = [math.exp(p / 5) + p**3 for p in ppl]  # strictly increasing in ppl
    again, _ = select(coords_frame(warped, [math.sqrt(e) for e in ent]), PruneConfig(scores="", out="", ratio=ratio))
    assert chosen(base) == chosen(again)


def test_a_ppl_outlier_is_not_filled_in_as_calibration_data():
    """A garbled answer (ppl 224, the highest entropy) among ordinary samples and one heavier ppl outlier: min-max
    squeezes the garbled answer's ppl towards 0, so it looks like low-ppl, high-entropy calibration data; with
    percentile ranks it is what it is, high on both axes (Q1 noise), and stays out."""
    rng = np.random.default_rng(0)
    ppl = list(rng.uniform(2.0, 6.0, 38)) + [2000.0, 224.0]
    ent = list(rng.uniform(0.5, 2.5, 38)) + [1.5, 4.6]
    frame = coords_frame(ppl, ent)
    outlier = frame["id"][-1]
    minmax, _ = select(frame, PruneConfig(scores="", out="", ratio=0.25, fill="minmax"))
    ranked, _ = select(frame, PruneConfig(scores="", out="", ratio=0.25))
    assert chosen(minmax).get(outlier) == "fill-Q4"  # the official code's normalisation keeps it
    assert outlier not in chosen(ranked)
    assert len(chosen(minmax)) == len(chosen(ranked)) == 10


@settings(max_examples=60, deadline=None)
@given(
    ppl=values, ent_seed=st.integers(0, 1000), ratio=st.floats(0.05, 1.0), bs=st.integers(1, 12), seed=st.integers(0, 5)
)
def test_batch_triage_matches_brute_force_per_batch(ppl, ent_seed, ratio, bs, seed):
    ent = list(np.random.default_rng(ent_seed).uniform(0, 5, len(ppl)))
    cfg = PruneConfig(scores="", out="", ratio=ratio, scope="batch", batch_size=bs, seed=seed)
    df, _ = select(coords_frame(ppl, ent), cfg)
    batches = sorted(set(df["batch"].to_list()))
    sizes = [df.filter(pl.col("batch") == b).height for b in batches]
    expected = {}
    for b, k in zip(batches, bf_split(bf_budget(ratio, len(ppl)), sizes), strict=True):
        part = df.filter(pl.col("batch") == b)
        expected |= bf_triage(part["id"].to_list(), part["ppl"].to_list(), part["ent"].to_list(), ratio, k=k)
        assert part["selection"].drop_nulls().len() == k
    assert chosen(df) == expected
    assert len(expected) == bf_budget(ratio, len(ppl))  # exact in batch scope too


@given(
    k_and_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30).flatmap(
        lambda sizes: st.tuples(st.integers(0, sum(sizes)), st.just(sizes))
    )
)
def test_split_budget_is_largest_remainder(k_and_sizes):
    k, sizes = k_and_sizes
    shares = pruning.split_budget(k, np.array(sizes)).tolist()
    assert shares == bf_split(k, sizes) and sum(shares) == k and all(0 <= s <= n for s, n in zip(shares, sizes))


def test_median_quadrants_and_edge_cases():
    df, summary = select(
        coords_frame([1.0, 9.0, 1.0, 9.0], [1.0, 1.0, 9.0, 9.0]), PruneConfig(scores="", out="", ratio=0.5)
    )
    assert df["quadrant"].to_list() == ["Q3", "Q2", "Q4", "Q1"]
    assert chosen(df) == {"id0001": "Q2", "id0002": "Q4"} and summary["alpha"] == 0.5
    # N = 1 keeps that sample; all-equal coordinates fall back to the deterministic fill
    one, _ = select(coords_frame([3.0], [2.0]), PruneConfig(scores="", out="", ratio=0.125))
    assert len(chosen(one)) == 1
    same, _ = select(coords_frame([2.0] * 10, [2.0] * 10), PruneConfig(scores="", out="", ratio=0.3))
    assert chosen(same) == {"id0000": "fill-Q2", "id0001": "fill-Q2", "id0002": "fill-Q2"}
    full, _ = select(coords_frame(list(range(1, 9)), list(range(8, 0, -1))), PruneConfig(scores="", out="", ratio=1.0))
    assert len(chosen(full)) == 8


def test_baselines_pick_extremes():
    ppl, ent = [5.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]
    for strategy, want in (
        ("ppl-high", {"id0000", "id0003"}),
        ("ppl-low", {"id0001", "id0002"}),
        ("entropy-high", {"id0002", "id0003"}),
        ("entropy-low", {"id0000", "id0001"}),
    ):
        df, _ = select(coords_frame(ppl, ent), PruneConfig(scores="", out="", ratio=0.5, strategy=strategy))
        assert set(chosen(df)) == want
    r1, _ = select(coords_frame(ppl, ent), PruneConfig(scores="", out="", ratio=0.5, strategy="random", seed=3))
    r2, _ = select(coords_frame(ppl, ent), PruneConfig(scores="", out="", ratio=0.5, strategy="random", seed=3))
    assert chosen(r1) == chosen(r2) and len(chosen(r1)) == 2


# ---------------------------------------------------------------- token masks


def bf_token_mask(logprob, trainable, ratio, lam, order, budget="sample", scale="ppl"):
    """The spec, one token at a time: per sample (the paper) or per assistant turn."""
    n = len(trainable)
    x = [(math.exp(-logprob[i]) if scale == "ppl" else -logprob[i]) if trainable[i] else 0.0 for i in range(n)]
    T = [i for i in range(n) if trainable[i]]
    protected = {i for i in T if i + 1 == n or not trainable[i + 1]}
    s = {i: (1 - lam) * x[i] + lam * ((x[i - 1] if i > 0 else 0) + (x[i + 1] if i + 1 < n else 0)) for i in T}

    def ranked(positions):
        return sorted(positions, key=lambda i: ((s[i] if order == "drop-high" else -s[i]), i))

    keep = set(protected)
    if budget == "sample":
        k = max(1, int(math.floor(ratio * len(T) + 0.5)))
        keep |= set(ranked(i for i in T if i not in protected)[: max(0, k - len(protected))])
    else:
        turns, run = [], []
        for i in range(n):
            if trainable[i]:
                run.append(i)
            elif run:
                turns, run = turns + [run], []
        for turn in turns + ([run] if run else []):
            free = [i for i in turn if i not in protected]
            k = max(1, int(math.floor(ratio * len(free) + 0.5))) if free else 0
            keep |= set(ranked(free)[:k])
    return [1 if i in keep else 0 for i in range(n)]


masks = st.lists(st.tuples(st.integers(0, 1), st.floats(-12, 0, allow_nan=False)), min_size=2, max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    tokens=masks,
    ratio=st.floats(0.01, 1.0),
    lam=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    order=st.sampled_from(["drop-high", "drop-low"]),
)
def test_token_mask_matches_brute_force_and_invariants(tokens, ratio, lam, order):
    trainable = np.array([t for t, _ in tokens], dtype=np.int8)
    trainable[0] = 0
    logprob = np.array([lp for _, lp in tokens], dtype=np.float32)
    if not trainable.any():
        trainable[-1] = 1
    mask = pruning.token_keep_mask(logprob, trainable, token_ratio=ratio, lam=lam, order=order)
    assert mask.tolist() == bf_token_mask(logprob.astype(np.float64), trainable, ratio, lam, order)
    assert not (mask & (trainable == 0)).any()  # never a non-trainable position
    protected = pruning.protected_positions(trainable, False)
    assert mask[protected].all()  # end-of-turn tokens always kept
    k = pruning.budget(ratio, int(trainable.sum()))
    assert mask.sum() == max(k, int(protected.sum()))
    for strategy in ("random", "ppl"):
        m = pruning.token_keep_mask(logprob, trainable, token_ratio=ratio, lam=lam, strategy=strategy, seed=1)
        assert m.sum() == mask.sum() and m[protected].all() and not (m & (trainable == 0)).any()
    assert (pruning.token_keep_mask(logprob, trainable, token_ratio=ratio, lam=lam, strategy="none") == trainable).all()


def test_context_score_uses_float64_and_zero_for_non_trainable_neighbours():
    lp = np.array([np.nan, -100.0, -1.0, -2.0], dtype=np.float32)
    t = np.array([0, 1, 1, 0], dtype=np.int8)
    s = pruning.context_scores(lp, t, 0.5)
    assert np.isfinite(s).all() and s[1] == pytest.approx(0.5 * math.exp(100) + 0.5 * math.e)
    assert s[2] == pytest.approx(0.5 * math.e + 0.5 * math.exp(100)) and s[0] == s[3] == 0


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    ratio=st.floats(0.05, 1.0),
    scope=st.sampled_from(["global", "batch"]),
    math_ratio=st.floats(0.05, 1.0),
)
def test_group_budgets_are_exact_and_groups_do_not_influence_each_other(data, ratio, scope, math_ratio):
    n = data.draw(st.integers(2, 60))
    ppl = data.draw(st.lists(st.floats(0.5, 50, allow_nan=False), min_size=n, max_size=n))
    ent = data.draw(st.lists(st.floats(0.1, 5, allow_nan=False), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.sampled_from(["math", "chat", "code"]), min_size=n, max_size=n))
    frame = coords_frame(ppl, ent).with_columns(group=pl.Series(groups))
    cfg = PruneConfig(scores="", out="", ratio=ratio, scope=scope, group_by="source", group_ratios={"math": math_ratio})
    df, _ = select(frame, cfg)
    for g in set(groups):
        part = df.filter(pl.col("group") == g)
        r = math_ratio if g == "math" else ratio
        assert part["selection"].drop_nulls().len() == pruning.budget(r, part.height)  # in either scope
        if scope == "global":
            alone, _ = select(frame.filter(pl.col("group") == g), PruneConfig(scores="", out="", ratio=r, scope=scope))
            assert chosen(part) == chosen(alone)  # the same as triaging that group by itself
        else:
            batches = sorted(set(part["batch"].to_list()))
            sizes = [part.filter(pl.col("batch") == b).height for b in batches]
            for b, k in zip(batches, bf_split(bf_budget(r, part.height), sizes), strict=True):
                assert part.filter(pl.col("batch") == b)["selection"].drop_nulls().len() == k


# ---------------------------------------------------------------- whole units and protected tokens


def bf_unit_mask(logprob, trainable, units, protect, ratio, lam, order):
    """The unit rule read literally: protected tokens (end of turn, `protect`, and every token of a unit that holds
    one) first; then whole units by mean score, lowest first for drop-high (ties by position), while fewer than k
    tokens are kept."""
    n = len(trainable)
    tp = [math.exp(-logprob[i]) if trainable[i] else 0.0 for i in range(n)]
    T = [i for i in range(n) if trainable[i]]
    s = {i: (1 - lam) * tp[i] + lam * ((tp[i - 1] if i > 0 else 0) + (tp[i + 1] if i + 1 < n else 0)) for i in T}
    keep = {i for i in T if i + 1 == n or not trainable[i + 1]} | {i for i in T if protect[i]}
    keep |= {i for i in T if units[i] in {units[j] for j in keep}}
    k = max(1, int(math.floor(ratio * len(T) + 0.5)))
    groups = {}
    for i in T:
        if i not in keep:
            groups.setdefault(units[i], []).append(i)
    ranked = sorted(
        groups.values(), key=lambda g: ((sum(s[i] for i in g) / len(g)) * (1 if order == "drop-high" else -1), g[0])
    )
    budget_left = k - len(keep)
    for g in ranked:
        if budget_left <= 0:
            break
        keep |= set(g)
        budget_left -= len(g)
    return [1 if i in keep else 0 for i in range(n)]


@st.composite
def unit_samples(draw):
    """Trainable flags, log-probs, units (runs of consecutive trainable tokens) and protected flags."""
    n = draw(st.integers(2, 40))
    trainable = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int8)
    trainable[0] = 0
    if not trainable.any():
        trainable[-1] = 1
    logprob = np.array(draw(st.lists(st.floats(-12, 0), min_size=n, max_size=n)), dtype=np.float32)
    starts_unit = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    units = np.full(n, -1, dtype=np.int64)
    u = -1
    for i in range(n):
        if trainable[i]:
            u += 1 if (starts_unit[i] or i == 0 or not trainable[i - 1]) else 0
            units[i] = u
    protect = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool) & draw(st.booleans())
    return trainable, logprob, units, protect


@settings(max_examples=300, deadline=None)
@given(
    sample=unit_samples(),
    ratio=st.floats(0.01, 1.0),
    lam=st.sampled_from([0.0, 0.5, 1.0]),
    order=st.sampled_from(["drop-high", "drop-low"]),
    strategy=st.sampled_from(["qtuning", "random", "ppl"]),
)
def test_unit_masks_keep_units_whole_protect_and_hold_the_budget(sample, ratio, lam, order, strategy):
    trainable, logprob, units, protect = sample
    kw = dict(token_ratio=ratio, lam=lam, order=order, units=units, protect=protect)
    mask = pruning.token_keep_mask(logprob, trainable, strategy=strategy, seed=3, **kw)
    if strategy == "qtuning":
        assert mask.tolist() == bf_unit_mask(logprob.astype(np.float64), trainable, units, protect, ratio, lam, order)
    t = trainable.astype(bool)
    assert not (mask.astype(bool) & ~t).any()
    for u in set(units[t].tolist()):  # a unit is in or out whole
        assert len(set(mask[units == u].tolist())) == 1
    must = pruning.protected_positions(trainable, False) | (protect & t)
    must |= np.isin(units, units[must]) & t
    assert mask[must].all()
    floor = max(pruning.budget(ratio, int(t.sum())), int(must.sum()))
    largest = max(np.bincount(units[t & ~must]).max(initial=0), 1) if (t & ~must).any() else 1
    assert floor <= mask.sum() < floor + largest  # k tokens, or fewer than one unit more


@settings(max_examples=200, deadline=None)
@given(tokens=masks, ratio=st.floats(0.01, 1.0), strategy=st.sampled_from(["qtuning", "random", "ppl"]))
def test_single_token_units_are_the_paper_rule_exactly(tokens, ratio, strategy):
    trainable = np.array([t for t, _ in tokens], dtype=np.int8)
    trainable[0] = 0
    trainable[-1] = 1
    logprob = np.array([lp for _, lp in tokens], dtype=np.float32)
    own = np.where(trainable == 1, np.arange(len(trainable)), -1)
    paper = pruning.token_keep_mask(logprob, trainable, token_ratio=ratio, lam=0.5, strategy=strategy, seed=5)
    units = pruning.token_keep_mask(
        logprob,
        trainable,
        token_ratio=ratio,
        lam=0.5,
        strategy=strategy,
        seed=5,
        units=own,
        protect=np.zeros_like(own, bool),
    )
    assert paper.tobytes() == units.tobytes()


# ---------------------------------------------------------------- the per-turn budget


@settings(max_examples=300, deadline=None)
@given(
    sample=unit_samples(),
    ratio=st.floats(0.01, 1.0),
    lam=st.sampled_from([0.0, 0.5, 1.0]),
    order=st.sampled_from(["drop-high", "drop-low"]),
    strategy=st.sampled_from(["qtuning", "random", "ppl"]),
    scale=st.sampled_from(["ppl", "nll"]),
    data=st.data(),
)
def test_per_turn_budget_keeps_protected_plus_its_share_of_each_turn(sample, ratio, lam, order, strategy, scale, data):
    """Per turn: kept = protected + max(1, round(ratio * prunable)), or fewer than one unit more; a turn with a
    word or number outside its protected spans keeps one of them."""
    trainable, logprob, units, protect = sample
    content = np.array(data.draw(st.lists(st.booleans(), min_size=len(trainable), max_size=len(trainable))))
    mask = pruning.token_keep_mask(
        logprob,
        trainable,
        token_ratio=ratio,
        lam=lam,
        order=order,
        strategy=strategy,
        seed=2,
        units=units,
        protect=protect,
        budget_scope="turn",
        scale=scale,
        content=content,
    )
    t = trainable.astype(bool)
    must = pruning.protected_positions(trainable, False) | (protect & t)
    must |= np.isin(units, units[must]) & t
    assert mask[must].all() and not (mask.astype(bool) & ~t).any()
    for u in set(units[t].tolist()):
        assert len(set(mask[units == u].tolist())) == 1
    turn = pruning.turn_index(trainable)
    for j in set(turn[t].tolist()):
        here = turn == j
        free = here & ~must
        kept = int(mask[here].sum())
        if not free.any():
            assert kept == int(must[here].sum())
            continue
        floor = int(must[here].sum()) + pruning.budget(ratio, int(free.sum()))
        largest = np.bincount(units[free]).max()
        assert floor <= kept < floor + largest
        if (content & free).any():
            assert mask[content & free].any()  # never a reply of punctuation alone


@settings(max_examples=300, deadline=None)
@given(
    tokens=masks,
    ratio=st.floats(0.01, 1.0),
    lam=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    order=st.sampled_from(["drop-high", "drop-low"]),
    scale=st.sampled_from(["ppl", "nll"]),
)
def test_per_turn_token_masks_match_the_brute_force(tokens, ratio, lam, order, scale):
    trainable = np.array([t for t, _ in tokens], dtype=np.int8)
    trainable[0] = 0
    if not trainable.any():
        trainable[-1] = 1
    logprob = np.array([lp for _, lp in tokens], dtype=np.float32)
    kw = dict(token_ratio=ratio, lam=lam, order=order, scale=scale)
    mask = pruning.token_keep_mask(logprob, trainable, budget_scope="turn", **kw)
    want = bf_token_mask(logprob.astype(np.float64), trainable, ratio, lam, order, "turn", scale)
    assert mask.tolist() == want
    sample = pruning.token_keep_mask(logprob, trainable, budget_scope="sample", **kw)
    assert sample.tolist() == bf_token_mask(logprob.astype(np.float64), trainable, ratio, lam, order, "sample", scale)


def test_a_surprising_neighbour_outweighs_the_word_on_the_ppl_scale_but_not_on_nll():
    """The issue's Alpaca example: ` demonstrated` (log-prob -5.4) beside ` been` (-0.38)."""
    lp = np.array([np.nan, -0.4, -0.38, -5.4, -0.3, -0.2], dtype=np.float32)
    t = np.array([0, 1, 1, 1, 1, 1], dtype=np.int8)
    ppl = pruning.context_scores(lp, t, 0.5, "ppl")
    nll = pruning.context_scores(lp, t, 0.5, "nll")
    assert ppl[2] > ppl[3]  # ` been` scores above the surprising word itself, by the neighbour's exp(5.4)
    # on NLL the neighbour adds its log-prob, not its exponential: the two words are within 0.05 of each other
    assert nll[3] == pytest.approx(0.5 * 5.4 + 0.5 * (0.38 + 0.3), rel=1e-6) and abs(nll[2] - nll[3]) < 0.06
    assert pruning.context_scores(lp, t, 0.0, "ppl").argmax() == 3  # lam 0: the word alone decides
