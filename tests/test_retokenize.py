"""Score with one model, train another: the masks carried over through the text, checked character by character."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import io
from curate.cli import app
from curate.config import PruneConfig, ScoreConfig
from curate.stages import prune, score

from .conftest import DEMO, build_tiny_model_dir, build_tiny_tokenizer, cpu_sft_args, data_files

# Another family: another vocabulary, another chat template, another end-of-turn marker.
OTHER_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|endoftext|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    tok = build_tiny_tokenizer(OTHER_TEMPLATE, vocab_size=600, eos="<|endoftext|>", words=False)
    return build_tiny_model_dir(tmp_path_factory.mktemp("other-family"), tokenizer=tok)


def pruned_run(tmp, model, limit=40):
    score.run(ScoreConfig(input=str(DEMO), out=str(tmp / "scores"), model=str(model), limit=limit, shard_size=16))
    prune.run(PruneConfig(scores=str(tmp / "scores"), out=str(tmp / "pruned"), ratio=0.5, token_ratio=0.5))
    return tmp / "pruned"


def by_id(folder):
    return {r["id"]: r for r in pq.read_table(data_files(folder)).to_pylist()}


def test_retokenizing_for_the_scoring_tokenizer_itself_reproduces_the_masks(tmp_path, tiny_model_dir):
    pruned = pruned_run(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(
        app, ["retokenize", str(pruned), "--model", str(tiny_model_dir), "--out", str(tmp_path / "t")]
    )
    assert res.exit_code == 0, res.output
    source, target = by_id(pruned), by_id(tmp_path / "t")
    assert source.keys() == target.keys()
    for sid, row in source.items():
        for col in ("input_ids", "labels", "loss_mask"):
            assert target[sid][col] == row[col], (sid, col)
    stats = io.read_json(tmp_path / "t" / "stats.json")
    assert stats["kept_chars_ratio"] == 1.0
    assert (stats["N"], stats["K"]) == (io.read_json(pruned / "stats.json")["N"], len(source))  # a pruned folder too
    # so it can be retokenized in turn
    res = CliRunner().invoke(
        app, ["retokenize", str(tmp_path / "t"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "t2")]
    )
    assert res.exit_code == 0, res.output
    assert by_id(tmp_path / "t2").keys() == source.keys()


def coverage(tokenizer, ids, mask, messages):
    """Per assistant turn, which content characters the loss covers, computed afresh: the text decoded from the
    ids, each turn's content found in it by plain search, and the tokenizer's own offsets."""
    text = tokenizer.decode(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == list(ids)
    turns, at = [], 0
    for m in messages:
        start = text.index(m["content"], at)
        at = start + len(m["content"])
        if m["role"] != "assistant":
            continue
        kept = np.zeros(len(m["content"]), dtype=bool)
        for (s, e), keep in zip(enc["offset_mapping"], mask):
            if keep:
                kept[max(s, start) - start : max(min(e, at), start) - start] = True
        turns.append(kept)
    return text, enc["offset_mapping"], turns


def check_carried_over(source_tok, target_tok, source_row, target_row):
    """The rule: a target token is in the loss exactly when all the content characters it covers were in the
    source's loss; the end-of-turn markers stay; nothing outside the assistant turns is in the loss."""
    msgs = source_row["messages"]
    _, _, src = coverage(source_tok, source_row["input_ids"], source_row["loss_mask"], msgs)
    text, offsets, tgt = coverage(target_tok, target_row["input_ids"], target_row["loss_mask"], msgs)
    for s, t in zip(src, tgt):
        assert not (t & ~s).any()  # nothing the scorer pruned is trained
    lost = sum(int((s & ~t).sum()) for s, t in zip(src, tgt))
    at, spans = 0, []
    for m in msgs:
        start = text.index(m["content"], at)
        at = start + len(m["content"])
        if m["role"] == "assistant":
            marker = text[at:].index("<|endoftext|>") + at + len("<|endoftext|>")
            spans.append((start, at, marker))
    for (s, e), keep in zip(offsets, target_row["loss_mask"]):
        inside = [sp for sp in spans if s < sp[2] and e > sp[0] - 1]
        if keep:
            assert inside, f"a loss token outside every assistant turn: {text[s:e]!r}"  # no prompt text
    for _, _, marker_end in spans:
        last = [k for k, (s, e) in enumerate(offsets) if e == marker_end]
        assert last and target_row["loss_mask"][last[0]] == 1  # the end-of-turn marker is learned
    return lost, sum(int(s.sum()) for s in src)


def test_across_tokenizers_the_loss_text_carries_over(tmp_path, tiny_model_dir, other_model):
    from transformers import AutoTokenizer

    pruned = pruned_run(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(
        app, ["retokenize", str(pruned), "--model", str(other_model), "--out", str(tmp_path / "t")]
    )
    assert res.exit_code == 0, res.output
    src_tok, tgt_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(other_model)
    source, target = by_id(pruned), by_id(tmp_path / "t")
    assert source.keys() == target.keys()
    lost = kept = 0
    for sid, row in target.items():
        assert row["loss_tokens_source"] == sum(source[sid]["loss_mask"]) and row["loss_tokens_target"] == sum(
            row["loss_mask"]
        )
        a, b = check_carried_over(src_tok, tgt_tok, source[sid], row)
        lost, kept = lost + a, kept + b
    stats = io.read_json(tmp_path / "t" / "stats.json")
    assert stats["kept_chars_ratio"] == pytest.approx(1 - lost / kept)
    assert 0.8 < stats["kept_chars_ratio"] < 1.0  # only token-boundary characters are lost


def test_a_straddling_target_token_leaves_the_loss():
    from curate.stages.retokenize import project
    from curate.tokenization import Rendered

    src = Rendered("Q: hello world", [(3, 14)], [(3, 14)])
    kept = [np.array([c != "w" for c in "hello world"])]  # the scorer pruned the "w" of "world"
    tgt = Rendered("A>hello world", [(2, 13)], [(2, 13)])
    starts, ends = np.array([0, 2, 7, 9]), np.array([2, 7, 9, 13])  # "A>", "hello", " w", "orld"
    assert project(src, kept, tgt, starts, ends).tolist() == [0, 1, 0, 1]


@pytest.mark.slow
def test_demo_scored_by_smollm2_trains_a_model_of_another_family_in_trl(tmp_path, smollm2_dir, other_model):
    """The issue's acceptance: the built-in SmolLM2 scores, another tokenizer's model trains (TRL)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    score.run(ScoreConfig(input=str(DEMO), out=str(tmp_path / "scores"), limit=48))
    res = CliRunner().invoke(
        app,
        [
            "prune",
            str(tmp_path / "scores"),
            "--out",
            str(tmp_path / "pruned"),
            "--ratio",
            "0.25",
            "--target-model",
            str(other_model),
        ],
    )
    assert res.exit_code == 0, res.output
    target = tmp_path / "pruned" / "target"
    source, carried = by_id(tmp_path / "pruned"), by_id(target)
    assert carried.keys() == source.keys() and len(carried) == 12
    src_tok, tgt_tok = AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(other_model)
    for sid, row in carried.items():
        check_carried_over(src_tok, tgt_tok, source[sid], row)
    ds = load_dataset("parquet", data_files=[str(f) for f in data_files(target)], split="train")
    args = cpu_sft_args(tmp_path / "o", max_steps=2)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(other_model), args=args, train_dataset=ds, processing_class=tgt_tok
    )
    assert trainer.train().global_step == 2
