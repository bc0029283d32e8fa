"""What a new user meets in the first hour: errors that say what to do, and output TRL and the Hub take as is."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from curate.cli import app

from .conftest import GSM8K_TEST, needs_shared, write_jsonl


@needs_shared
def test_wrong_field_names_name_the_field_the_rows_lack_and_the_fields_to_use(tmp_path, tiny_model_dir):
    args = ["score", str(GSM8K_TEST), "--fields", "prompt=q,response=a", "--limit", "5", "--out", str(tmp_path / "s")]
    res = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)], env={"COLUMNS": "400"})
    text = " ".join(res.output.split())
    assert res.exit_code == 2
    assert "the rows have no field 'q'" in text and "the first row's fields are question, answer" in text
    assert "--fields prompt=question,response=answer" in text


def test_a_hub_model_that_is_not_at_hand_fails_at_once_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    )
    started = time.monotonic()
    res = CliRunner().invoke(app, ["score", str(data), "--out", str(tmp_path / "s"), "--model", "nobody/no-model"])
    assert res.exit_code == 2 and time.monotonic() - started < 30
    text = " ".join(res.output.split())
    assert "--model nobody/no-model: not a local folder, not in the Hub cache, and HF_HUB_OFFLINE is set" in text
    assert "pass a local model folder to --model" in text and "score: done" not in text
    assert not (tmp_path / "s").exists()


def test_the_score_summary_names_the_models_folder(tmp_path, tiny_model_dir):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}]}],
    )
    res = CliRunner().invoke(
        app, ["score", str(data), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir)], env={"COLUMNS": "400"}
    )
    assert res.exit_code == 0 and str(tiny_model_dir.resolve()) in res.output


TOOLS = [{"name": "get_time", "description": "the time", "parameters": {"type": "object", "properties": {}}}]


@pytest.mark.slow
def test_trl_reads_the_output_as_a_conversational_dataset_with_tools(tmp_path, tiny_model_dir, smollm2_dir):
    """messages holds system/user/assistant/tool turns only and the schemas are in `tools` (JSON text): TRL's
    conversational format, to which the built-in model's chat template applies as is."""
    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    rows = []
    for i in range(12):
        conversation = [
            {"from": "human", "value": f"what time is it in zone {i}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"zone": i}})},
            {"from": "observation", "value": json.dumps({"time": f"{i}:00"})},
            {"from": "gpt", "value": f"It is {i}:00 there."},
        ]
        rows.append({"conversations": conversation, "tools": json.dumps(TOOLS) if i % 3 else "[]"})
    data = tmp_path / "glaive-like.json"
    data.write_text(json.dumps(rows))
    cli = CliRunner()
    assert (
        cli.invoke(app, ["score", str(data), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir)]).exit_code
        == 0
    )
    res = cli.invoke(app, ["prune", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--ratio", "1.0"])
    assert res.exit_code == 0, res.output
    ds = datasets.load_dataset(str(tmp_path / "p"), split="train", cache_dir=str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with_tools = 0
    for example in ds:
        assert {m["role"] for m in example["messages"]} <= {"system", "user", "assistant", "tool"}
        assert is_conversational(example)
        if example["tools"] is not None:
            assert json.loads(example["tools"]) == TOOLS
            with_tools += 1
        text = apply_chat_template(
            {"messages": example["messages"]}, tokenizer, tools=json.loads(example["tools"] or "null")
        )
        assert "what time is it" in text["text"]
    assert with_tools == 8


def test_the_card_says_what_a_reader_needs_to_trust_it(tmp_path, tiny_model_dir):
    """No licence in the source: said, and the source named; only --limit rows read: said; duplicates left out:
    explained; the score settings beside prune's; the Hub's size and task metadata."""
    from curate.card import front_matter

    turn = lambda i: [{"role": "user", "content": f"q {i % 6}"}, {"role": "assistant", "content": f"a {i % 6} b"}]
    data = write_jsonl(tmp_path / "mine.jsonl", [{"messages": turn(i)} for i in range(20)])  # 6 distinct
    cli = CliRunner()
    args = ["score", str(data), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--limit", "12"]
    assert cli.invoke(app, [*args, "--dtype", "float32"]).exit_code == 0
    assert (
        cli.invoke(app, ["prune", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--ratio", "0.5"]).exit_code == 0
    )
    card = (tmp_path / "p" / "README.md").read_text()
    text = " ".join(card.split())
    assert "licence: the source's card names none; check the terms of `mine.jsonl` before you publish" in text
    assert "only the first 12 rows of the source were read (`--limit`)" in text
    assert "6 later copies of identical conversations were left out before the triage" in text
    assert f"scored with: `curate score mine.jsonl --model {tiny_model_dir} --dtype float32 --limit 12`" in text
    assert "pruned with: `curate prune SCORES --ratio 0.5`" in text
    header = front_matter(card, "README.md")
    assert header["task_categories"] == ["text-generation"] and header["size_categories"] == ["n<1K"]
    assert "license" not in header
