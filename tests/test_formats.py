import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.formats import Sample, Skip, parse_fields, read_samples
from curate.readers import count_rows

from .conftest import ALPACA, GLAIVE, GSM8K_TEST, needs_shared, write_jsonl


def samples(path, **kw):
    return [s for s in read_samples(Path(path), **kw) if isinstance(s, Sample)]


@needs_shared
def test_a_written_copy_reads_back_as_the_same_samples_tools_included(tmp_path):
    """The probe and the experiment write (corrupted) copies of the input and score them: every row must come back,
    tool schemas and ids as they were (a leading `tools` message written as is was an unknown role: 191 of 300
    glaive rows were skipped)."""
    from curate.corrupt import write_rows

    original = samples(GLAIVE)
    assert sum(s.messages[0]["role"] == "tools" for s in original) > 100
    write_rows(tmp_path / "copy.jsonl", [{"id": s.id, "messages": s.messages} for s in original])
    back = list(read_samples(tmp_path / "copy.jsonl"))
    assert [b.id for b in back] == [s.id for s in original]  # no Skip among them
    assert [b.messages for b in back] == [s.messages for s in original]


@needs_shared
def test_gsm8k_with_fields_and_auto_detected_pair():
    fields = parse_fields("prompt=question,response=answer")
    with_fields = samples(GSM8K_TEST, fields=fields)
    auto = samples(GSM8K_TEST)
    assert len(with_fields) == len(auto) == 1319
    first = json.loads(open(GSM8K_TEST).readline())
    assert with_fields[0].messages == [
        {"role": "user", "content": first["question"]},
        {"role": "assistant", "content": first["answer"]},
    ]
    assert [s.id for s in with_fields] == [s.id for s in auto]
    assert len({s.id for s in auto}) == 1319


@needs_shared
def test_alpaca_and_sharegpt_tool_calls():
    alpaca = samples(ALPACA)
    assert len(alpaca) == 999
    raw = json.load(open(ALPACA))
    assert alpaca[0].messages[-1] == {"role": "assistant", "content": raw[0]["output"]}
    glaive = samples(GLAIVE)
    assert len(glaive) == 300
    first = json.load(open(GLAIVE))[0]
    roles = [m["role"] for m in glaive[0].messages]
    # tools -> a leading `tools` message (context); function_call -> assistant (trainable); observation -> tool
    assert roles[0] == "tools" and "search_recipes" in glaive[0].messages[0]["content"]
    assert roles[1:] == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert glaive[0].messages[4]["content"] == first["conversations"][3]["value"]


def test_openai_prompt_completion_parquet_and_datasets_folder(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
            "id": "a",
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "y"},
            ],
            "id": 7,
        },
    ]
    got = samples(write_jsonl(tmp_path / "a.jsonl", rows))
    assert [s.id for s in got] == ["a", "7"] and got[1].messages[0]["content"] == "x"

    pc = [{"prompt": "2+2?", "completion": "4"}]
    (tmp_path / "pc.json").write_text(json.dumps(pc))
    assert samples(tmp_path / "pc.json")[0].messages[1] == {"role": "assistant", "content": "4"}

    pq.write_table(
        pa.Table.from_pylist([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]),
        tmp_path / "p.parquet",
    )
    assert len(samples(tmp_path / "p.parquet")) == 2 and count_rows(tmp_path / "p.parquet") == 2

    import datasets

    datasets.Dataset.from_list([{"instruction": "say a", "input": "", "output": "a"}]).save_to_disk(
        str(tmp_path / "ds")
    )
    assert samples(tmp_path / "ds")[0].messages == [
        {"role": "user", "content": "say a"},
        {"role": "assistant", "content": "a"},
    ]


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    rows = [
        good,
        "{not json",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
        {"text": "no messages"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        [1, 2],
    ]
    out = list(read_samples(write_jsonl(tmp_path / "bad.jsonl", rows)))
    skips = {s.row: s for s in out if isinstance(s, Skip)}
    assert len([s for s in out if isinstance(s, Sample)]) == 1
    assert {row: s.reason for row, s in skips.items()} == {
        2: "invalid_json",
        3: "empty_assistant_turn",
        4: "unknown_role",
        5: "non_string_content",
        6: "missing_field",
        7: "no_assistant_turn",
        8: "not_an_object",
    }
    assert skips[4].field == "messages[0].role"


def test_unrecognised_format_and_bad_fields_are_clear_errors(tmp_path):
    with pytest.raises(CurateError, match=r"x.jsonl: cannot recognise the format from the first 1 rows.*--fields"):
        list(read_samples(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1, "bar": 2}])))
    with pytest.raises(CurateError, match="--fields"):
        parse_fields("prompt=question")
    with pytest.raises(CurateError, match="no such file"):
        list(read_samples(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("tools", [[], None, "[]", " [] ", "null", "", {}, "{}"])
@pytest.mark.parametrize("shape", ["openai", "sharegpt"])
def test_no_tools_means_no_tools_text(tmp_path, tools, shape):
    """glaive writes `"tools": "[]"` for conversations without tools: no tools message, so the template renders no
    `You can call these tools:` prompt."""
    from curate.tokenization import ChatEncoder

    from .conftest import build_tiny_tokenizer

    if shape == "openai":
        row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    else:
        row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (only,) = samples(write_jsonl(tmp_path / "rows.jsonl", [{**row, "tools": tools}]))
    assert [m["role"] for m in only.messages] == ["user", "assistant"]
    text = ChatEncoder(build_tiny_tokenizer()).render(only.messages).text
    assert "tools" not in text
    # scores written before this fix carry an empty tools message: it renders no text either
    old = [{"role": "tools", "content": "[]"}, *only.messages]
    assert ChatEncoder(build_tiny_tokenizer()).render(old).text == text
