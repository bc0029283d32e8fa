"""`curate experiment` end to end on a tiny model (the smoke configuration), and the GSM8K answer parser."""

import json
from fractions import Fraction

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from curate import io
from curate.cli import app
from curate.held_out import exact_match, parse_number

from .conftest import GSM8K_TEST, data_files, needs_shared, write_jsonl


def arithmetic_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 + i % 7, 5 + i % 11
        rows.append(
            {
                "question": f"the fox has {a} and {b} more. how many?",
                "answer": f"the fox has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
            }
        )
    return rows


def smoke_config(tmp_path, model) -> dict:
    return {
        "run_dir": str(tmp_path / "exp"),
        "train_data": str(write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))),
        "score": {"model": str(model), "max_length": 256},
        "train": {"epochs": 1, "batch_size": 4, "lora_rank": 0, "lr": 1.0e-3, "device": "cpu"},
        "budgets": [{"ratio": 0.5, "token_ratio": 0.5, "arms": ["full", "qtuning", "qtuning-tokens"]}],
        "robustness": {"fraction": 0.25, "ratio": 0.5, "token_ratio": 0.5, "train_arms": ["random"]},
        "eval": {
            "data": str(write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(8, offset=100))),
            "limit": 8,
            "em_limit": 4,
            "max_new_tokens": 6,
            "batch_size": 4,
            "device": "cpu",
        },
    }


def test_smoke_experiment_trains_every_arm_on_exactly_its_data_and_resumes(tmp_path, tiny_model_dir):
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config(tmp_path, tiny_model_dir)))
    res = CliRunner().invoke(app, ["experiment", str(config)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "exp"
    results = json.loads((run / "results.json").read_text())
    assert set(results["arms"]) == {"full", "qtuning-0.5x0.5", "qtuning-tokens-0.5x0.5"}
    trained = list(results["arms"].values()) + list(results["robustness"]["trained"].values())
    fingerprints = set()
    for arm in trained:
        (r,) = arm["runs"]
        files = data_files(io.Path(r["data"]))
        table = pq.read_table(files, columns=["loss_mask"])
        loss_tokens = pc.sum(pc.list_flatten(table.column("loss_mask"))).as_py()
        assert r["samples"] == table.num_rows  # trained on exactly its pruned rows
        assert r["loss_tokens"] == r["data_loss_tokens"] == loss_tokens  # one epoch: exactly its loss tokens once
        fingerprints.add((r["nll_rows"], r["em_rows"]))
        assert r["nll"] > 0 and 0 <= r["em"] <= 1
    assert len(fingerprints) == 1  # every arm evaluated on the same rows
    assert results["arms"]["full"]["runs"][0]["samples"] == 16
    assert results["arms"]["qtuning-0.5x0.5"]["runs"][0]["samples"] == 8
    assert (
        results["arms"]["qtuning-0.5x0.5"]["runs"][0]["loss_tokens"] < results["arms"]["full"]["runs"][0]["loss_tokens"]
    )
    # the token-rule arm trains the same samples under the paper's per-token rule; both report final-answer NLL
    words, tokens = (results["arms"][a]["runs"][0] for a in ("qtuning-0.5x0.5", "qtuning-tokens-0.5x0.5"))
    assert words["selection"] == tokens["selection"] and words["final_nll"] > 0 and tokens["final_nll"] > 0
    assert results["base"]["final_nll"] > 0 and "final-answer NLL" in (run / "results.md").read_text()
    kept = results["robustness"]["kept"]
    assert set(kept) >= {"qtuning", "random", "ppl-high", "entropy-low"}
    assert all(k["kept"] == 8 and 0 <= k["corrupted"] <= 4 for k in kept.values())
    assert results["robustness"]["corrupted_rows"] == 4
    md = (run / "results.md").read_text()
    assert "| full | full | 16 |" in md and "qtuning-0.5x0.5" in md and "corrupted among kept" in md
    assert (run / "results.png").stat().st_size > 10_000
    # A rerun trains nothing again: every stage finds its result done.
    models = {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")}
    res = CliRunner().invoke(app, ["experiment", str(config)])
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("model.safetensors")} == models


def test_bad_experiment_configs_are_reported_at_once(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": "x",
                "train_data": "y",
                "equal": "steps",
                "budgets": [{"ratio": 2, "token_ratio": 0.5, "arms": ["everything"]}],
                "eval": {"data": "z"},
            }
        )
    )
    res = CliRunner().invoke(app, ["experiment", str(config)])
    assert res.exit_code == 2
    for key in ("budgets.0.ratio", "budgets.0.arms.0"):
        assert key in res.output, res.output


@pytest.mark.parametrize(
    "train,equal,says",
    [
        ({"dynamic": True}, "steps", "train.dynamic and train.selection are set by each arm"),
        ({"selection": {"ratio": 0.5}}, "steps", "train.dynamic and train.selection are set by each arm"),
        ({"max_steps": 20}, "epochs", "train.max_steps with equal: epochs"),
    ],
)
def test_training_settings_that_would_change_what_an_arm_is_are_refused(tmp_path, train, equal, says):
    """train: is shared by every arm: a selection there would make full data dynamic too, and max_steps under equal
    epochs would be dropped."""
    config = tmp_path / "bad.yaml"
    cfg = {"run_dir": "x", "train_data": "y", "equal": equal, "train": train, "eval": {"data": "z"}}
    config.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["experiment", str(config)])
    assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output


@pytest.mark.parametrize(
    "text,number",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
        ("#### 1,000", 1000),
        ("It costs $18 in total.\n#### $18", 18),
        ("So the answer is 0.5", Fraction(1, 2)),
        ("The temperature drops to -3 degrees. The answer is -3.", -3),
        ("First 3 apples, then 4 more, so 7 apples.", 7),
        ("#### 42 is the answer, not 41", 42),
        ("no number here", None),
    ],
)
def test_answer_parser(text, number):
    assert parse_number(text) == number


@needs_shared
def test_answer_parser_reads_every_real_gsm8k_answer():
    rows = [json.loads(line) for line in open(GSM8K_TEST)]
    for r in rows:
        gold = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert parse_number(r["answer"]) == Fraction(gold), r["answer"]
        assert exact_match(f"Let me think. {r['answer'].split('####')[0]} The answer is {gold}.", r["answer"])
    assert not exact_match("The answer is 3.", "#### 4")


def test_final_answer_tokens_are_the_number_after_the_hashes(tiny_model_dir):
    from transformers import AutoTokenizer

    from curate.held_out import final_answer_tokens
    from curate.tokenization import ChatEncoder

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    messages = [{"role": "user", "content": "3 and 4?"}, {"role": "assistant", "content": "3 + 4 = 7\n#### 1,207"}]
    answer, final = final_answer_tokens(encoder, messages)
    rendered = encoder.render(messages)
    ids, starts, ends = encoder.tokenize(rendered.text)
    covered = "".join(rendered.text[starts[i] : ends[i]] for i in range(len(ids)) if final[i])
    assert covered.strip() == "1,207" and (answer >= final).all() and final.sum() < answer.sum()


def test_the_papers_protocol_gives_every_arm_full_datas_steps_and_says_what_each_cost(tmp_path, tiny_model_dir):
    """equal: steps. Full data and the in-trainer arms see every row; a static subset gets its share of the batch;
    the refresh arm re-scores every epoch. Every arm takes full data's optimizer steps, and the table says what each
    computed."""
    cfg = smoke_config(tmp_path, tiny_model_dir)
    arms = ["full", "dynamic-qtuning", "dynamic-paper", "dynamic-random", "refresh", "qtuning", "random-samples"]
    cfg.update(equal="steps", robustness=None, budgets=[{"ratio": 0.5, "token_ratio": 0.5, "arms": arms}])
    cfg["train"]["epochs"] = 2
    config = tmp_path / "protocol.yaml"
    config.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["experiment", str(config)])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    runs = {name.removesuffix("-0.5x0.5"): a["runs"][0] for name, a in results["arms"].items()}
    full = runs["full"]
    assert full["steps"] == 8 and full["batch_size"] == 4  # 16 rows, batch 4, 2 epochs
    assert all(r["steps"] == 8 for r in runs.values()), {n: r["steps"] for n, r in runs.items()}
    for name in (
        "dynamic-qtuning",
        "dynamic-paper",
        "dynamic-random",
    ):  # every row through the forward, half in the loss
        r = runs[name]
        assert r["kind"] == "dynamic" and r["forward_tokens"] == full["forward_tokens"]
        assert 0 < r["loss_tokens"] < full["loss_tokens"] / 2 + 1
        assert sum(r["kept_by_selection"].values()) == 16  # 2 of each batch of 4, 8 steps
    for name in ("dynamic-qtuning", "dynamic-paper"):
        assert set(runs[name]["kept_by_selection"]) <= {"Q2", "Q4", "fill-Q2", "fill-Q4"}
    paper = io.read_manifest(tmp_path / "exp" / "arms" / "dynamic-paper-0.5x0.5" / "seed-0" / "model")
    selection = paper["config"]["selection"]  # the released code's rule
    assert (selection["preset"], selection["entropy_positions"], selection["token_order"]) == (
        "paper",
        "all",
        "drop-high",
    )
    assert set(runs["dynamic-random"]["kept_by_selection"]) == {"random"}
    for name in ("qtuning", "random-samples"):  # 8 samples at batch 2: the same steps, half the forward compute
        r = runs[name]
        assert r["kind"] == "static" and r["batch_size"] == 2 and r["samples"] == 8
        assert r["forward_tokens"] < 0.7 * full["forward_tokens"]
    refresh = runs["refresh"]
    rounds = sorted((tmp_path / "exp" / "arms" / "refresh-0.5x0.5" / "seed-0" / "refresh").glob("round-*"))
    assert refresh["kind"] == "refresh" and len(rounds) == 2 and refresh["batch_size"] == 2
    scoring = sum(io.read_manifest(r / "scores")["counts"]["tokens"] for r in rounds)
    training = sum(io.read_manifest(r / "model")["counts"]["forward_tokens"] for r in rounds)
    assert refresh["forward_tokens"] == scoring + training
    md = (tmp_path / "exp" / "results.md").read_text()
    assert "equal steps (static subsets: a smaller batch)" in md and "| forward tokens | loss tokens |" in md
    assert "| dynamic-qtuning-0.5x0.5 | dynamic | 16 | 4 | 8 |" in md


def test_full_datas_steps_are_counted_as_the_trainer_counts_them():
    """An epoch of 16 rows at batch 4 is 4 micro-batches; with 3 of them per step the Trainer takes 2 steps (the last
    one short), so 2 epochs are 4 steps (not 2: a floor would give full data fewer steps than it trains)."""
    from types import SimpleNamespace

    from curate.stages.experiment import full_steps

    def cfg(**train):
        return SimpleNamespace(train=SimpleNamespace(**{"max_steps": None, "epochs": 2, "grad_accum": 1, **train}))

    assert full_steps(cfg(batch_size=4, grad_accum=3), 16) == 4
    assert full_steps(cfg(batch_size=4), 16) == 8
    assert full_steps(cfg(batch_size=8, epochs=3), 128) == 48
    assert full_steps(cfg(batch_size=8, max_steps=5), 128) == 5
