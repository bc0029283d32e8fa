"""Input readers: files of SFT rows in common shapes -> canonical conversations.

A canonical conversation is a list of {"role", "content"} with roles system / user / assistant / tool.
Assistant output (including ShareGPT `function_call`) is what the model is trained on; tool results
(`observation`) are context.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CurateError, RowError

FORMATS = ("auto", "openai", "sharegpt", "alpaca", "prompt-completion", "pairs")

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
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}


@dataclass(frozen=True)
class Sample:
    """One usable input row: its stable id, where it came from, and its canonical conversation."""

    id: str
    row: int
    messages: list[dict[str, str]]


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


# ---------------------------------------------------------------- raw rows


def count_rows(path: Path) -> int | None:
    """Number of rows, cheaply, for progress bars (None when unknown)."""
    if path.is_dir():
        try:
            return len(_load_dataset_dir(path))
        except CurateError:
            return None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def _load_dataset_dir(path: Path):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is part of the hf extra
        raise CurateError("reading a save_to_disk folder needs datasets: pip install 'q-curate[hf]'") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CurateError(f"{path}: not a `datasets` save_to_disk folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CurateError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, record) for every row; a row that is not valid JSON yields a RowError.

    Row numbers are 1-based line numbers for JSONL and 0-based indices for arrays, Parquet and datasets.
    """
    if not path.exists():
        raise CurateError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from enumerate(_load_dataset_dir(path))
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
        return
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
        return
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CurateError(f"{path}: invalid JSON array at line {e.lineno}: {e.msg}") from e
            yield from enumerate(data)
            return
        yield from _read_jsonl(path)  # a .json file holding JSON lines
        return
    raise CurateError(f"{path}: unsupported input type {suffix!r}; use .jsonl, .json, .parquet or a save_to_disk folder")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RowError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")


# ---------------------------------------------------------------- format detection


def detect_format(record: dict, fields: dict[str, str]) -> str:
    if fields:
        return "pairs"
    keys = set(record)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    for p, r in AUTO_PAIRS:
        if p in keys and r in keys:
            return "pairs"
    raise CurateError(
        f"cannot recognise the format from the fields {sorted(keys)}; use --format "
        f"({', '.join(FORMATS[1:])}) or --fields prompt=FIELD,response=FIELD"
    )


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
    if not allow_empty and not value.strip():
        raise RowError("empty_content", f"field {field!r} is empty", field=field)
    return value


def _get(record: dict, field: str) -> Any:
    if field not in record:
        raise RowError("missing_field", f"field {field!r} is missing", field=field)
    return record[field]


def _from_openai(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    msgs = _get(record, "messages")
    return _role_list(msgs, "messages", "role", "content", OPENAI_ROLES)


def _from_sharegpt(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    turns = _get(record, "conversations")
    messages = _role_list(turns, "conversations", "from", "value", SHAREGPT_ROLES)
    tools = record.get("tools")
    if tools:
        # Tool schemas are part of the prompt the assistant saw; keep them as (untrained) system context.
        tool_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        note = f"You can call these tools:\n{tool_text}"
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
        else:
            messages.insert(0, {"role": "system", "content": note})
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _role_list(turns: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RowError("empty_conversation", f"field {field!r} is not a non-empty list", field=field)
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("not_an_object", f"{where} is not an object", field=where)
        role = turn.get(role_key)
        if role not in roles:
            raise RowError("unknown_role", f"{where}.{role_key} = {role!r} is not a known role "
                           f"({', '.join(sorted(roles))})", field=f"{where}.{role_key}")
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
    if not isinstance(extra, str):
        raise RowError("non_string_content", "field 'input' is not a string", field="input")
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(_get(record, "output"), "output", True)})
    return messages


def _from_prompt_completion(record: dict, fields: dict[str, str]) -> list[dict[str, str]]:
    prompt, completion = _get(record, "prompt"), _get(record, "completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational prompt-completion
        return _role_list(prompt, "prompt", "role", "content", OPENAI_ROLES) + _role_list(
            completion, "completion", "role", "content", OPENAI_ROLES)
    return [{"role": "user", "content": _text(prompt, "prompt")},
            {"role": "assistant", "content": _text(completion, "completion", True)}]


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
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise RowError("no_assistant_turn", "the conversation has no assistant turn to train on")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty_assistant_turn", f"assistant turn {i} is empty", field=f"messages[{i}].content")


def sample_id(record: dict, row: int, messages: list[dict[str, str]], id_field: str) -> str:
    own = record.get(id_field)
    if isinstance(own, (str, int)) and not isinstance(own, bool) and str(own).strip():
        return str(own)
    digest = hashlib.sha1(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:12]
    return f"{digest}-{row}"


def read_samples(path: Path, fmt: str = "auto", fields: dict[str, str] | None = None) -> Iterator[Sample | Skip]:
    """Every row of `path` as a Sample, or as a Skip with its reason. Raises CurateError for file-level errors."""
    if fmt not in FORMATS:
        raise CurateError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    fields = fields or {}
    id_field = fields.get("id", "id")
    resolved = None if fmt == "auto" else fmt
    seen: set[str] = set()
    for row, record in read_records(path):
        if isinstance(record, RowError):
            yield Skip(row, record.reason, record.field, str(record))
            continue
        if not isinstance(record, dict):
            yield Skip(row, "not_an_object", None, f"row is {type(record).__name__}, not an object")
            continue
        if resolved is None:
            try:
                resolved = detect_format(record, fields)
            except CurateError as e:
                raise CurateError(f"{path}, row {row}: {e}") from None
        try:
            messages = CONVERTERS[resolved](record, fields)
            validate_conversation(messages)
        except RowError as e:
            yield Skip(row, e.reason, e.field, str(e))
            continue
        sid = sample_id(record, row, messages, id_field)
        if sid in seen:
            yield Skip(row, "duplicate_id", id_field, f"id {sid!r} already used by an earlier row")
            continue
        seen.add(sid)
        yield Sample(sid, row, messages)
