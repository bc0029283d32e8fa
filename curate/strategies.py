"""Sample strategies, each one declaration: its name, what it keeps in a line, the columns it reads, whether token
pruning applies to what it keeps, and its selection function. Pure: numpy in, a `pruning.Triage` out.

`curate prune --strategy`, config validation, `curate probe`, `curate experiment` (every strategy is an arm), the
report's legend and the docs read this registry; a strategy registered from outside (`register(Strategy(...))`
before the run) is in all of them with no other edit. A selection function gets `id`, `ppl`, `ent` and the columns
of samples.parquet it `needs` (numpy arrays of one partition's samples), the exact budget `k`, a `seed` and the
fill rule, and returns a `Triage` that keeps exactly `k` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from . import pruning
from .errors import CurateError

BASE_COLUMNS = ("id", "ppl", "ent")


@dataclass(frozen=True)
class Strategy:
    name: str
    doc: str  # what it keeps, in a line: for --help, the report's legend, the probe and the docs
    select: Callable[[Mapping[str, np.ndarray], int, int, str], pruning.Triage]  # (columns, k, seed, fill)
    needs: tuple[str, ...] = ()  # columns of samples.parquet beyond BASE_COLUMNS
    signals: tuple[str, ...] = ()  # the `curate score --signals` those columns come from
    # The selection labels whose samples get token pruning; None: every sample it keeps (labelled with its name)
    pruned_labels: tuple[str, ...] | None = None
    random: bool = False  # blind to the scores: the probe averages many seeds

    @property
    def prunes_tokens(self) -> bool:
        """Whether token pruning applies to any sample it keeps."""
        return self.pruned_labels is None or bool(self.pruned_labels)

    def tokens_pruned(self, selection: str | None) -> bool:
        """Whether the tokens of a sample this strategy kept with `selection` are pruned."""
        if selection is None:
            return False
        return selection == self.name if self.pruned_labels is None else selection in self.pruned_labels


REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise CurateError(f"no sample strategy named {name!r} (strategies: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def names() -> list[str]:
    return list(REGISTRY)


def chosen(n: int, picked: np.ndarray, label: str, notes: dict | None = None) -> pruning.Triage:
    selection = np.full(n, None, dtype=object)
    selection[picked] = label
    return pruning.Triage(selection, None, {}, notes or {})


def ranked(name: str, key: Callable[[Mapping[str, np.ndarray]], np.ndarray]):
    """A selection function that keeps the k samples with the smallest `key` (ties by id)."""

    def select(t, k, seed, fill):
        return chosen(len(t["id"]), np.lexsort((t["id"], key(t)))[:k], name)

    return select


def _qtuning(t, k, seed, fill):
    return pruning.qtuning_triage(t["id"], t["ppl"], t["ent"], k, fill)


def _random(t, k, seed, fill):
    return chosen(len(t["id"]), np.random.default_rng(seed).permutation(len(t["id"]))[:k], "random")


def _ifd(t, k, seed, fill):
    """Cherry LLM's rule: IFD >= 1 means the instruction does not help the model predict the answer (misaligned),
    so such samples are never chosen while others remain; among the others, the highest IFD first. To keep the
    exact budget when fewer than k have IFD < 1, the misaligned ones closest to 1 fill it, then those without an
    IFD (no answer token to score alone)."""
    ifd = np.asarray(t["ifd"], dtype=np.float64)
    known = np.isfinite(ifd)
    aligned = known & (ifd < 1)
    tier = np.where(aligned, 0, np.where(known, 1, 2))
    key = np.where(aligned, -ifd, np.where(known, ifd, 0.0))
    picked = np.lexsort((t["id"], key, tier))[:k]
    below = int(aligned.sum())
    notes = {"ifd_below_1": below, "kept_with_ifd_at_least_1": max(0, k - below)}
    return chosen(len(ifd), picked, "ifd", notes)


for _s in (
    Strategy(
        "qtuning",
        "Q-Tuning: Q2 (high perplexity, low entropy) and Q4 (low perplexity, high entropy) by quantile thresholds, "
        "then the fill; tokens pruned in Q2 only",
        _qtuning,
        pruned_labels=("Q2", "fill-Q2"),  # misconceptions are pruned; calibration data (Q4) trains whole
    ),
    Strategy("random", "random samples (the paper's baseline); tokens pruned in each", _random, random=True),
    Strategy("ppl-high", "the highest perplexity first", ranked("ppl-high", lambda t: -t["ppl"])),
    Strategy("ppl-low", "the lowest perplexity first", ranked("ppl-low", lambda t: t["ppl"])),
    Strategy("entropy-high", "the highest mean entropy first", ranked("entropy-high", lambda t: -t["ent"])),
    Strategy("entropy-low", "the lowest mean entropy first", ranked("entropy-low", lambda t: t["ent"])),
    Strategy(
        "ifd",
        "IFD (Cherry LLM; Superfiltering with a small model): samples with IFD < 1 by the highest IFD first, IFD = "
        "the answer's perplexity after the instruction over its perplexity alone; whole samples "
        "(needs score --signals ifd)",
        _ifd,
        needs=("ifd",),
        signals=("ifd",),
        pruned_labels=(),
    ),
    Strategy(
        "longest",
        "the most trainable tokens first (the paper's Longest baseline); whole samples",
        ranked("longest", lambda t: -t["n_trainable"]),
        needs=("n_trainable",),
        pruned_labels=(),
    ),
):
    register(_s)
