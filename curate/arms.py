"""The settings behind a name: `--preset paper`, and the arms of `curate experiment` (each a set of prune settings:
a fixed rule below, or any registered sample strategy). No imports of config or stages, so both can read it."""

from __future__ import annotations

from . import strategies

# `--preset paper`: the paper's rule (arXiv 2509.23873) where q-curate's defaults differ from it, and the official
# code's min-max fill (docs/algorithm.md says where and why each default differs).
PRESETS = {
    "paper": {
        "token_unit": "token",
        "protect": [],
        "token_order": "drop-high",
        "token_budget": "sample",
        "token_score": "ppl",
        "lam": 0.5,
        "placement": "conversation",
        "fill": "minmax",
    }
}

# arm -> the prune settings it sets; `full` keeps every sample whole. `qtuning` is `curate prune` as its defaults
# stand; the `qtuning-*` token arms keep qtuning's samples and pin the whole token rule, so a later change of a
# default neither changes them nor makes a finished experiment redo them.
PAPER_TOKENS = {"token_unit": "token", "protect": [], "token_order": "drop-high", "token_budget": "sample"}
DEFAULT_PROTECT = ["final-answer", "tool-calls"]


def token_rule(
    unit: str, protect: list[str], order: str = "drop-high", budget: str = "sample", score: str = "ppl", lam=0.5
) -> dict:
    return {
        "strategy": "qtuning",
        "token_strategy": "qtuning",
        "token_unit": unit,
        "protect": protect,
        "token_order": order,
        "token_budget": budget,
        "token_score": score,
        "lam": lam,
    }


ARMS = {
    "full": {"strategy": "random", "token_strategy": "none"},
    "random": {"strategy": "random", "token_strategy": "random", **PAPER_TOKENS},  # the paper's random baseline
    "qtuning": {"strategy": "qtuning", "token_strategy": "qtuning"},
    "qtuning-tokens": token_rule("token", []),
    "qtuning-words": token_rule("word", []),
    "qtuning-words-final": token_rule("word", ["final-answer"]),
    "qtuning-words-final-droplow": token_rule("word", ["final-answer"], "drop-low"),
    # the budget over all of a sample's tokens (protected ones counted in it) against the budget per turn, and the
    # context-aware score on the NLL scale and without its context (lam 0)
    "qtuning-sample-budget": token_rule("word", DEFAULT_PROTECT, "drop-low", "sample"),
    "qtuning-turn-budget": token_rule("word", DEFAULT_PROTECT, "drop-low", "turn"),
    "qtuning-turn-nll": token_rule("word", DEFAULT_PROTECT, "drop-low", "turn", "nll"),
    "qtuning-turn-lam0": token_rule("word", DEFAULT_PROTECT, "drop-low", "turn", "ppl", 0.0),
    "paper": {"strategy": "qtuning", "token_strategy": "qtuning", "preset": "paper", **PRESETS["paper"]},
    # no token pruning: the token settings are inert, pinned to the values this arm first ran with
    "qtuning-samples": {**token_rule("word", DEFAULT_PROTECT), "token_strategy": "none"},
    "ppl-high": {"strategy": "ppl-high", "token_strategy": "none"},
    "ppl-low": {"strategy": "ppl-low", "token_strategy": "none"},
    "entropy-high": {"strategy": "entropy-high", "token_strategy": "none"},
    "entropy-low": {"strategy": "entropy-low", "token_strategy": "none"},
    # random samples kept whole: whether a selection beats chance at the same samples (and, at a matched ratio, the
    # same loss tokens)
    "random-samples": {"strategy": "random", "token_strategy": "none"},
}

# The paper's protocol (EXPERIMENTS.md): arms that train on every sample and select in each micro-batch with
# the model being trained (`curate train --dynamic`), each with the selection it applies there.
DYNAMIC_ARMS = {
    "dynamic-qtuning": {"strategy": "qtuning", "token_strategy": "qtuning"},
    "dynamic-random": ARMS["random"],  # random samples of each micro-batch x random tokens (the paper's baseline)
    # the released code's rule: the paper's preset, and entropy averaged over every attended position
    "dynamic-paper": {**ARMS["paper"], "entropy_positions": "all"},
}
# Its offline twin: one round per epoch, each scoring the whole training set with the latest checkpoint, pruning
# with these settings and training one epoch on the kept samples (`curate refresh`).
REFRESH_ARMS = {"refresh": ARMS["qtuning"]}


def arm_kind(arm: str) -> str:
    """How an arm trains: static (prune once, train on the subset), dynamic (select per micro-batch in the trainer)
    or refresh (prune again every epoch with the latest checkpoint)."""
    return "dynamic" if arm in DYNAMIC_ARMS else "refresh" if arm in REFRESH_ARMS else "static"


def arm_settings(arm: str) -> dict:
    """The selection settings of an arm: a fixed rule (ARMS, DYNAMIC_ARMS, REFRESH_ARMS), else a registered sample
    strategy (its tokens pruned by the prune section's rule where the strategy prunes tokens)."""
    for table in (ARMS, DYNAMIC_ARMS, REFRESH_ARMS):
        if arm in table:
            return table[arm]
    strategy = strategies.get(arm)
    return {"strategy": arm, "token_strategy": "qtuning" if strategy.prunes_tokens else "none"}


def arm_names() -> list[str]:
    return list(dict.fromkeys([*ARMS, *DYNAMIC_ARMS, *REFRESH_ARMS, *strategies.names()]))
