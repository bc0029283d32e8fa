"""What a token is, in the text it covers: whole-word units, protected spans and the kind of a token. Pure.

Every function takes the templated conversation `text` and each token's character span [starts, ends) from
the fast tokenizer's offsets (docs/algorithm.md, "Whole units and protected spans").
"""

from __future__ import annotations

import json
import re

import numpy as np
import regex

# A number with its separators (12, 1,234.5) first, so `1,234` is one unit and not three; else a run of word
# characters (letters, digits, underscore: `calculate_discount` is one identifier).
UNIT = re.compile(r"\d+(?:[.,]\d+)+|\w+")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# The GSM8K answer line; a last \boxed{...} is found by brace matching (it nests).
FINAL_ANSWER_LINE = re.compile(r"####[^\n]*")
BOXED = "\\boxed{"
CODE_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
PRESETS = ("final-answer", "numbers", "tool-calls", "code")
WATCHED_NAMES = {"final-answer": "final answer", "tool-calls": "tool call"}  # the spans as a sentence says them
KINDS = ("digits", "words", "punctuation")  # what a masked token is, for the summary


def unit_ids(text: str, starts: np.ndarray, ends: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """int64 per position: the unit of each trainable token (-1 elsewhere), numbered from 0 in text order.

    Tokens that cover characters of the same word or number share a unit, and a token that covers parts of two
    (`=3` in `12=3`, or a tokenizer whose tokens run across spaces) joins them, so no word or number is ever
    split. A token that covers no word character (punctuation, spaces, markup) is a unit of its own.
    """
    n = len(starts)
    t = trainable.astype(bool)
    char_unit = np.full(len(text) + 1, -1, dtype=np.int64)
    for j, m in enumerate(UNIT.finditer(text)):
        char_unit[m.start() : m.end()] = j
    covered = np.flatnonzero(char_unit[:-1] >= 0)
    # first and last word character inside each token's span, if any
    first_at = np.searchsorted(covered, starts, side="left")
    last_at = np.searchsorted(covered, ends, side="left") - 1
    first = np.full(n, -1, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    if len(covered):
        ok = first_at < len(covered)
        ok &= covered[np.minimum(first_at, len(covered) - 1)] < ends
        first[ok] = char_unit[covered[first_at[ok]]]
        ok_last = (last_at >= 0) & ok
        last[ok_last] = char_unit[covered[last_at[ok_last]]]
    joined = np.zeros(n, dtype=bool)
    joined[1:] = t[1:] & t[:-1] & (first[1:] >= 0) & (first[1:] == last[:-1])
    unit = np.cumsum(t & ~joined) - 1
    return np.where(t, unit, -1)


def _last_boxed(text: str, lo: int, hi: int) -> tuple[int, int] | None:
    at = text.rfind(BOXED, lo, hi)
    if at < 0:
        return None
    depth, i = 0, at + len(BOXED) - 1
    while i < hi:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return at, i + 1
        i += 1
    return at, hi


def is_tool_call(value) -> bool:
    """A function call as the formats write one: {"name", "arguments"|"parameters"}, OpenAI's {"function": ...},
    or a list of them."""
    if isinstance(value, list):
        return bool(value) and all(is_tool_call(v) for v in value)
    if not isinstance(value, dict):
        return False
    if "function" in value and isinstance(value["function"], dict):
        return is_tool_call(value["function"])
    return "name" in value and ("arguments" in value or "parameters" in value)


def _tool_calls(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Spans of JSON function calls inside [lo, hi): each `{` or `[` is tried as the start of a JSON value."""
    decoder, spans, i = json.JSONDecoder(), [], lo
    while i < hi:
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text[:hi], i)
            except ValueError:
                value, end = None, i + 1
            if is_tool_call(value):
                spans.append((i, end))
                i = end
                continue
        i += 1
    return spans


def protected_spans(
    text: str, contents: list[tuple[int, int]], presets: tuple[str, ...], patterns: tuple[str, ...] = ()
) -> list[tuple[int, int, str]]:
    """[lo, hi, name] character spans, inside the assistant contents, that token pruning must never touch.

    Presets: `final-answer` (a `#### ...` line, else the last `\\boxed{...}` of a turn), `numbers`, `tool-calls`
    (JSON function calls and their arguments), `code` (fenced blocks); `patterns` are regexes.
    """
    spans = []
    for lo, hi in contents:
        for name in presets:
            if name == "final-answer":
                found = [m.span() for m in FINAL_ANSWER_LINE.finditer(text, lo, hi)]
                boxed = None if found else _last_boxed(text, lo, hi)
                found += [boxed] if boxed else []
            elif name == "numbers":
                found = [m.span() for m in NUMBER.finditer(text, lo, hi)]
            elif name == "tool-calls":
                found = _tool_calls(text, lo, hi)
            else:  # code
                found = [m.span() for m in CODE_FENCE.finditer(text, lo, hi)]
            spans += [(a, b, name) for a, b in found if b > a]
        for pattern in patterns:  # searched in the turn's content alone (pos/endpos: absolute offsets)
            try:
                found = list(regex.compile(pattern).finditer(text, lo, hi, timeout=REGEX_TIMEOUT_S))
            except TimeoutError:
                raise RegexTimeout(pattern) from None
            spans += [(*m.span(), pattern) for m in found if m.end() > m.start()]
    return spans


REGEX_TIMEOUT_S = 1.0  # per assistant turn: a user's pattern that backtracks without end stops the run, named


class RegexTimeout(Exception):
    """A --protect-regex search ran past REGEX_TIMEOUT_S on one turn (the caller names the sample)."""


def tokens_touching(starts: np.ndarray, ends: np.ndarray, spans: list[tuple[int, int, str]]) -> np.ndarray:
    """bool per token: its characters overlap at least one span."""
    hit = np.zeros(len(starts), dtype=bool)
    for lo, hi, _ in spans:
        hit |= (starts < hi) & (ends > lo)
    return hit


def token_kinds(text: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index into KINDS per token: digits if it covers a digit, else words if a letter, else punctuation."""
    kinds = np.empty(len(starts), dtype=np.int8)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        piece = text[s:e]
        kinds[i] = 0 if any(c.isdigit() for c in piece) else 1 if any(c.isalpha() for c in piece) else 2
    return kinds
