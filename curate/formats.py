"""Input rows in common shapes -> canonical conversations.

A canonical conversation is a list of {"role", "content"} with roles system / user / assistant / tool.
Assistant output (including ShareGPT `function_call`) is what the model is trained on; tool results
(`observation`) are context. Anything wrong with one row makes that row a `Skip` with a reason and a field.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CurateError, RowError
from .schema import TOOLS_ROLE

FORMATS = ("auto", "openai", "sharegpt", "alpaca", "prompt-completion", "pairs")
DETECT_ROWS = 100  # the format is decided by majority over this many first rows

# Prompt/response field pairs recognised without --fields, in order of preference.
AUTO_PAIRS = [
    ("question", "answer"),
    ("prompt", "response"),
    ("query", "response"),
    ("instruction", "response"),
    ("question", "response"),
    ("prompt", "answer"),
    ("input", "output"),
]

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # the model's own output: trainable
    "observation": "tool",  # the tool's answer: context only
    "tool": "tool",
}
OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


@dataclass(frozen=True)
class Sample:
    """One usable input row: its stable id, where it came from, and its canonical conversation."""

    id: str
    row: int
    messages: list[dict[str, str]]
    content_hash: str
    extra: dict[str, Any] = field(default_factory=dict)  # fields carried from the input (--keep-fields)


@dataclass(frozen=True)
class Skip:
    """One unusable input row, with the reason counted in the manifest."""

    row: int
    reason: str
    field: str | None
    message: str


def parse_fields(spec: str | None) -> dict[str, str]:
    """`prompt=question,response=answer[,system=sys][,id=uid]` -> mapping."""
    if not spec:
        return {}
    out: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("prompt", "response", "system", "id") or not value:
            raise CurateError(
                f"--fields: cannot read {part!r}; expected e.g. prompt=question,response=answer "
                "(keys: prompt, response, system, id)"
            )
        out[key] = value
    if "prompt" not in out or "response" not in out:
        raise CurateError("--fields needs both prompt=FIELD and response=FIELD")
    return out


# ---------------------------------------------------------------- format detection


def detect_one(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if any(p in keys and r in keys for p, r in AUTO_PAIRS):
        return "pairs"
    return None


def detect_format(path: Path, records: list[Any], fields: dict[str, str]) -> str:
    """The format most of the first rows have; rows of another shape are later skipped one by one."""
    if fields:
        return "pairs"
    votes = Counter(f for f in map(detect_one, records) if f)
    if not votes:
        seen = sorted({k for r in records[:5] if isinstance(r, dict) for k in r})
        raise CurateError(
            f"{path}: cannot recognise the format from the first {len(records)} rows (fields {seen}); use --format "
            f"({', '.join(FORMATS[1:])}) or --fields prompt=FIELD,response=FIELD"
        )
    return votes.most_common(1)[0][0]


def auto_pair_fields(record: dict) -> dict[str, str]:
    for p, r in AUTO_PAIRS:
        if p in record and r in record:
            return {"prompt": p, "response": r}
    return {}


# ---------------------------------------------------------------- converters (record -> messages)


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError("missing_field", f"field {field!r} is missing", field=field)
    if not isinstance(value, str):
        raise RowError("non_string_content", f"field {field!r} is {type(value).__name__}, not a string", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: from a "\ud800" escape or a byte that was not UTF-8
        raise RowError(
            "invalid_unicode",
            f"field {field!r} holds text that is not valid Unicode at character {e.start} ({value[e.start]!r})",
            field=field,
        ) from None
    if not allow_empty and not value.strip():
        raise RowError("empty_content", f"field {field!r} is empty", field=field)
    return value


def _get(record: dict, field: str) -> Any:
    if field not in record:
        raise RowError("missing_field", f"field {field!r} is missing", field=field)
    return record[field]


def _from_openai(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    return _with_tools(record, _role_list(_get(record, "messages"), "messages", "role", "content", OPENAI_ROLES))


def _from_sharegpt(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    messages = _role_list(_get(record, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(system, "system")})
    return _with_tools(record, messages)


def no_tools(tools: Any) -> bool:
    """Missing, null, an empty list or object, or text that is one of those as JSON (glaive writes `"[]"`): no tools,
    so no tools text in the prompt."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            return False  # text that is not JSON: the prompt names tools in its own words
    return not tools


def split_tools(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the turns, the tool schemas as JSON text or None): the scores' leading `tools` message as its own field."""
    if messages and messages[0]["role"] == TOOLS_ROLE:
        return list(messages[1:]), messages[0]["content"]
    return list(messages), None


def to_record(sample_id: str, messages: list[dict]) -> dict:
    """A canonical conversation as an OpenAI-format row that `read_samples` reads back as the same sample: the tool
    schemas (its leading `tools` message) in their own `tools` field, as TRL's conversational format has them."""
    turns, tools = split_tools(messages)
    return {"id": sample_id, "messages": turns, **({"tools": tools} if tools else {})}


def join_tools(messages: list[dict], tools: str | None) -> list[dict]:
    """The inverse of `split_tools`: the conversation as the chat encoder renders it."""
    return [{"role": TOOLS_ROLE, "content": tools}, *messages] if tools else list(messages)


def _with_tools(record: dict, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Tool schemas are part of the prompt the assistant saw: they lead the conversation as a `tools` message
    (JSON text), which the chat encoder gives the template (its `tools=`) or writes into the system prompt. A
    system prompt beside them is kept (LLaMA-Factory's shape has both: neither may be lost)."""
    tools = record.get("tools")
    if no_tools(tools):
        return messages
    tool_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    return [{"role": TOOLS_ROLE, "content": _text(tool_text, "tools")}, *messages]


def _role_list(turns: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RowError("empty_conversation", f"field {field!r} is not a non-empty list", field=field)
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("not_an_object", f"{where} is not an object", field=where)
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise RowError(
                "unknown_role",
                f"{where}.{role_key} = {role!r} is not a known role ({', '.join(sorted(roles))})",
                field=f"{where}.{role_key}",
            )
        content = turn.get(content_key)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)  # OpenAI content parts
        if content is None and turn.get("tool_calls"):
            content = json.dumps(turn["tool_calls"], ensure_ascii=False)
        # Empty turns pass here; validate_conversation rejects an empty assistant turn by name.
        out.append({"role": roles[role], "content": _text(content, f"{where}.{content_key}", allow_empty=True)})
    return out


def _from_alpaca(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    instruction = _text(_get(record, "instruction"), "instruction")
    extra = record.get("input") or ""
    extra = _text(extra, "input", allow_empty=True)
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": _text(system, "system")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(_get(record, "output"), "output", True)})
    return messages


def _from_prompt_completion(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    prompt, completion = _get(record, "prompt"), _get(record, "completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational prompt-completion
        return _role_list(prompt, "prompt", "role", "content", OPENAI_ROLES) + _role_list(
            completion, "completion", "role", "content", OPENAI_ROLES
        )
    return [
        {"role": "user", "content": _text(prompt, "prompt")},
        {"role": "assistant", "content": _text(completion, "completion", True)},
    ]


def _from_pairs(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    fields = fields or auto_pair_fields(record)
    if not fields:
        raise RowError("missing_field", "no prompt/response fields found; pass --fields prompt=X,response=Y")
    messages = []
    if "system" in fields and record.get(fields["system"]):
        messages.append({"role": "system", "content": _text(record[fields["system"]], fields["system"])})
    messages.append({"role": "user", "content": _text(_get(record, fields["prompt"]), fields["prompt"])})
    messages.append({"role": "assistant", "content": _text(_get(record, fields["response"]), fields["response"], True)})
    return messages


CONVERTERS: dict[str, Callable[[dict, dict[str, str]], list[dict[str, str]]]] = {
    "openai": _from_openai,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt-completion": _from_prompt_completion,
    "pairs": _from_pairs,
}


def validate_conversation(messages: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant_turn", "the conversation has no assistant turn to train on")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty_assistant_turn", f"assistant turn {i} is empty", field=f"messages[{i}].content")


def content_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha1(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def sample_id(record: dict, row: int, digest: str, id_field: str) -> str:
    own = record.get(id_field)
    if isinstance(own, (str, int)) and not isinstance(own, bool) and str(own).strip():
        return _text(str(own), id_field)
    return f"{digest[:12]}-{row}"


def _carried(record: dict, keep: list[str]) -> dict[str, str | None]:
    """Fields carried into the scores as strings (JSON for anything that is not a string); None when absent."""
    out = {}
    for name in keep:
        value = record.get(name)
        out[name] = value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def to_sample(row: int, record: Any, fmt: str, fields: dict[str, str], keep: list[str] | None = None) -> Sample | Skip:
    """One input row as a Sample, or as a Skip with its reason. Never raises for a bad row."""
    if isinstance(record, RowError):
        return Skip(row, record.reason, record.field, str(record))
    if not isinstance(record, dict):
        return Skip(row, "not_an_object", None, f"row is {type(record).__name__}, not an object")
    try:
        messages = CONVERTERS[fmt](record, fields)
        validate_conversation(messages)
        digest = content_hash(messages)
        sid = sample_id(record, row, digest, fields.get("id", "id"))
        return Sample(sid, row, messages, digest[:16], _carried(record, keep or []))
    except RowError as e:
        return Skip(row, e.reason, e.field, str(e))
    except (RecursionError, TypeError, ValueError, AttributeError) as e:  # a shape no converter foresaw
        return Skip(row, "malformed_row", None, f"cannot read this row as {fmt}: {type(e).__name__}: {e}")


def read_samples(path: str | Path, fmt: str = "auto", fields: dict[str, str] | None = None) -> Iterator[Sample | Skip]:
    """Every row of a file as a Sample or a Skip, in order (the whole file in one pass: for tests and tools;
    `curate score` reads shard by shard)."""
    from . import readers

    fields = fields or {}
    whole = readers.plan(path, 2**62)
    if fmt == "auto":
        fmt = detect_format(path, readers.head(path, DETECT_ROWS), fields)
    for rows in whole:
        for row, record in readers.read_range(path, rows):
            yield to_sample(row, record, fmt, fields)
