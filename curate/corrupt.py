"""Documented ways to break a copy of a dataset, so a probe can count how much of the breakage a strategy keeps.

Rows are canonical ({"id", "messages"}); every corruption makes a real error, never a no-op: a row counts as
corrupted only when the result is a conversation the clean data does not hold (not its own, nor another row's).
- `answer` (rows with one assistant turn): the answer is another chosen row's answer (a cyclic shift over the chosen
  rows; where the previous one's answer is the same text, the one before it, and so on).
- `reply` (multi-turn rows): the last free-text assistant reply becomes another conversation's last free-text reply;
  only replies that hold a number and run over 60 characters are moved, so each swap states a wrong fact.
- `arguments` (rows with a tool call whose arguments hold a number): every number in the last such call's arguments
  is changed (n -> 3n + 7), so the call asks for something else than the conversation wants.
Pure: rows in, rows out; `write_rows` writes them as `curate score` reads them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from . import io
from .formats import to_record
from .units import is_tool_call

KINDS = ("answer", "reply", "arguments")
NUMBER = re.compile(r"\d")


def _assistant_turns(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _call(content: str):
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if is_tool_call(value) else None


def _last_reply(messages: list[dict]) -> int | None:
    """The last assistant turn that is free text (not a tool call), holds a number and runs over 60 characters."""
    for i in reversed(_assistant_turns(messages)):
        c = messages[i]["content"]
        if _call(c) is None:
            return i if NUMBER.search(c) and len(c) > 60 else None
    return None


def _last_numeric_call(messages: list[dict]) -> int | None:
    for i in reversed(_assistant_turns(messages)):
        call = _call(messages[i]["content"])
        if call is not None and NUMBER.search(json.dumps(call)):
            return i
    return None


def kinds_for(messages: list[dict]) -> list[str]:
    """The corruptions that apply to a conversation."""
    if len(_assistant_turns(messages)) == 1:
        return ["answer"]
    found = []
    if _last_reply(messages) is not None:
        found.append("reply")
    if _last_numeric_call(messages) is not None:
        found.append("arguments")
    return found


def _shift_numbers(value):
    """Every number in a JSON value changed to 3n + 7 (strings that are numbers too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value * 3 + 7
    if isinstance(value, str):
        return re.sub(r"\d+(?:\.\d+)?", lambda m: str(int(float(m.group()) * 3 + 7)), value)
    if isinstance(value, list):
        return [_shift_numbers(v) for v in value]
    if isinstance(value, dict):  # the function's name stays: the call is to the right tool, with wrong values
        return {k: v if k == "name" else _shift_numbers(v) for k, v in value.items()}
    return value


def _conversation(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def corrupt(rows: list[dict], fraction: float, seed: int, kinds: tuple[str, ...] = KINDS) -> tuple[list[dict], dict]:
    """A copy of `rows` with round(fraction * n) of them chosen for corruption (at least 2), each by one kind that
    applies to it (the kinds taken in turn). Returns the rows and {corrupted id: kind}: the chosen rows that a
    corruption really changed into a conversation the clean rows do not hold (with answers that repeat, a swap
    may find no other answer)."""
    rng = np.random.default_rng(seed)
    applicable = [[k for k in kinds_for(r["messages"]) if k in kinds] for r in rows]
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["id"], i)
    # a later row with an id already used is never chosen: scoring skips it, and its id names the first row
    eligible = [i for i, a in enumerate(applicable) if a and first[rows[i]["id"]] == i]
    n = min(len(eligible), max(2, round(fraction * len(rows))))
    chosen = sorted(rng.choice(eligible, size=n, replace=False).tolist()) if n else []
    out = [dict(r, messages=[dict(m) for m in r["messages"]]) for r in rows]
    by_kind: dict[str, list[int]] = {k: [] for k in kinds}
    for j, i in enumerate(chosen):
        options = applicable[i]
        by_kind[options[j % len(options)]].append(i)
    clean = {_conversation(r["messages"]) for r in rows}
    done = {}

    def put(i: int, turn: int, content: str, kind: str) -> bool:
        """Row i with turn `turn` replaced, where that makes a conversation the clean rows do not hold."""
        messages = [dict(m) for m in out[i]["messages"]]
        messages[turn]["content"] = content
        if _conversation(messages) in clean:
            return False
        out[i]["messages"], done[rows[i]["id"]] = messages, kind
        return True

    for kind, picked in by_kind.items():
        if kind == "arguments":
            for i in picked:
                t = _last_numeric_call(out[i]["messages"])
                put(i, t, json.dumps(_shift_numbers(_call(out[i]["messages"][t]["content"])), ensure_ascii=False), kind)
            continue
        turn = _assistant_turns if kind == "answer" else None
        where = [turn(rows[i]["messages"])[-1] if turn else _last_reply(rows[i]["messages"]) for i in picked]
        for j, (dst, d_turn) in enumerate(zip(picked, where)):
            # the previous chosen row's text, else the one before it: the first that changes this row
            for back in range(1, len(picked)):
                src, s_turn = picked[j - back], where[j - back]
                if put(dst, d_turn, rows[src]["messages"][s_turn]["content"], kind):
                    break
    return out, done


def write_rows(path: Path, rows: list[dict]) -> None:
    """Canonical rows ({id, messages}) as JSONL that `curate score` reads back as the same samples, tools included."""
    lines = (json.dumps(to_record(r["id"], r["messages"]), ensure_ascii=False) + "\n" for r in rows)
    io.write_bytes_atomic(path, "".join(lines).encode())
