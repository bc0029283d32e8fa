"""Which samples and tokens stay in the loss: one model for `curate prune` and the in-trainer loss."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import RUNTIME, Options, Ratio


def _strategy_docs() -> list[tuple[str, str]]:
    from .. import strategies

    return [(s.name, s.doc) for s in strategies.REGISTRY.values()]


class SelectionOptions(Options):
    """Which samples and tokens stay in the loss: the triage and the token rule, shared by `curate prune` (over a
    data set) and the in-trainer loss (`curate.dynamic`, over each micro-batch), with the same names and defaults."""

    ratio: Ratio = Field(0.125, description="Fraction of samples to keep, in (0, 1]: exactly max(1, round(ratio*N)).")
    token_ratio: Ratio = Field(
        0.5, description="Fraction of trainable tokens kept in Q2 (misconception) samples, in (0, 1]."
    )
    preset: Literal["paper"] | None = Field(
        None,
        description="paper: every option of the paper's rule at once (--token-unit token --protect none "
        "--token-order drop-high --token-budget sample --token-score ppl --lam 0.5 --placement conversation "
        "--fill minmax); options given beside it still apply.",
        json_schema_extra=RUNTIME,  # a shorthand: the options it sets are fingerprinted themselves
    )
    lam: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Context weight of the token score (1-lam)*x_i + lam*(x_i-1 + x_i+1): 0 scores a token by itself "
        "(default, chosen by experiment: EXPERIMENTS.md), 0.5 is the paper's context-aware score.",
    )
    token_score: Literal["ppl", "nll"] = Field(
        "ppl",
        description="The x of the token score: ppl (exp(-log-prob), the paper's formula) or nll (-log-prob: one "
        "surprising neighbour cannot outweigh the token itself by orders of magnitude).",
    )
    token_budget: Literal["turn", "sample"] = Field(
        "turn",
        description="turn: every assistant turn keeps its protected spans and end-of-turn marker plus "
        "--token-ratio of its other tokens (at least one word of every reply); sample: --token-ratio of all the "
        "sample's trainable tokens, protected ones counted in it (the paper's budget: tool calls use it up).",
    )
    entropy_positions: Literal["response", "all"] = Field(
        "response", description="Mean entropy over response tokens (paper) or over all positions (official code)."
    )
    placement: Literal["conversation", "worst-turn", "max-turn"] = Field(
        "max-turn",
        description="Where a multi-turn sample sits on the EU plane: conversation (mean over all assistant tokens, "
        "the paper), worst-turn (at its assistant turn with the highest perplexity) or max-turn (each coordinate "
        "the largest over its assistant turns). Single-turn samples sit at the same point under every rule.",
    )
    token_order: Literal["drop-high", "drop-low"] = Field(
        "drop-low",
        description="drop-low: remove the lowest-scoring tokens, the ones the reference model already predicts "
        "(default, chosen by experiment: EXPERIMENTS.md); drop-high: remove the ones it finds MOST surprising (the "
        "paper's rule, which with a small reference model masks the content a model must learn).",
    )
    token_unit: Literal["word", "token"] = Field(
        "word",
        description="word: a word or a number (with its separators) leaves the loss whole or not at all, scored "
        "by the mean of its tokens' scores; token: single tokens, the paper's rule exactly.",
    )
    protect: list[Literal["final-answer", "numbers", "tool-calls", "code"]] = Field(
        default_factory=lambda: ["final-answer", "tool-calls"],
        description="Spans token pruning never removes (kept besides the per-turn budget; the per-sample budget "
        "counts them), comma-separated: "
        "final-answer (a GSM8K `#### N` line, else a last \\boxed{}), numbers, tool-calls (JSON function calls), "
        "code (fenced blocks); `none` for nothing. Default: final-answer,tool-calls.",
    )
    protect_regex: str | None = Field(
        None, description="Also protect what this regular expression matches in an assistant turn's text."
    )
    strategy: str = Field(
        "qtuning",
        description="Sample strategy (curate.strategies; a strategy registered there from Python is allowed too): "
        + "; ".join(f"{name}: {doc}" for name, doc in _strategy_docs())
        + ".",
    )
    token_strategy: Literal["qtuning", "random", "ppl", "none"] = Field(
        "qtuning", description="Token strategy: Q-Tuning, random, ppl (drop highest token PPL), or none."
    )
    fill: Literal["rank", "minmax"] = Field(
        "rank",
        description="How the budget is filled after the quadrants: percentile ranks, or min-max (the official code).",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from .. import strategies

        if v not in strategies.REGISTRY:
            raise ValueError(f"must be one of {', '.join(strategies.names())}")
        return v

    @field_validator("protect", mode="before")
    @classmethod
    def _parse_protect(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [] if v.strip() in ("", "none") else [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("protect_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            import regex

            try:
                regex.compile(v)
            except regex.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        """A preset fills in the options it names that were not given (the ones given win)."""
        from ..arms import PRESETS

        if isinstance(values, dict) and values.get("preset") in PRESETS:
            return {**PRESETS[values["preset"]], **values}
        return values
