import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate import pruning, schema
from curate.cli import app
from curate.config import PruneConfig
from curate.errors import CurateError, StaleOutputError
from curate.stages.prune import run
from curate.synthetic import synthetic_scores

from .conftest import DEMO, Recorder, needs_shared, restamp
from .test_pruning import bf_token_mask, bf_triage

# synthetic scores have no tokenizer to read token text with: prune them per token, as the paper does
PER_TOKEN = {"token_unit": "token", "protect": []}
PAPER = {**PER_TOKEN, "token_order": "drop-high"}  # the paper's token rule exactly


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    synthetic_scores(d, 203, mean_tokens=30, shard_size=50)
    return d


def check_pruned(scores_dir, out, cfg):
    """Every invariant of the pruned output, against the scores it came from."""
    src = {r["id"]: r for r in pq.read_table(sorted(scores_dir.glob("part-*.parquet"))).to_pylist()}
    files = sorted((out / "data").glob("train-*.parquet"))
    rows = pq.read_table(files).to_pylist()
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    k = pruning.budget(cfg.ratio, len(src))
    assert len(rows) == k  # in batch scope too
    assert len({r["id"] for r in rows}) == len(rows)
    assert sorted(s["id"] for s in samples) == sorted(src)  # nobody lost: every id is kept or listed as dropped
    kept_ids = {s["id"] for s in samples if s["kept"]}
    assert kept_ids == {r["id"] for r in rows}
    assert all(s["quadrant"] in ("Q1", "Q2", "Q3", "Q4") for s in samples)
    for r in rows:
        s = src[r["id"]]
        trainable = np.array(s["trainable"])
        labels, mask = np.array(r["labels"]), np.array(r["loss_mask"])
        assert r["input_ids"] == s["input_ids"] and r["assistant_masks"] == r["loss_mask"]
        assert ((labels == -100) == (mask == 0)).all()
        assert (labels[mask == 1] == np.array(r["input_ids"])[mask == 1]).all()
        assert (labels[trainable == 0] == -100).all()
        assert set(r["attention_mask"]) == {1}
        if r["selection"] in ("Q4", "fill-Q4") or cfg.token_strategy == "none":
            assert (mask == trainable).all()
        else:
            ends = pruning.protected_positions(trainable, False)
            floor = pruning.budget_floor(trainable, ends, cfg.token_ratio, cfg.token_budget)
            if cfg.token_unit == "word" or cfg.protect:  # whole units: k tokens or fewer than one unit more
                assert mask.sum() >= floor
                continue
            assert mask.sum() == floor
            if cfg.token_strategy == "qtuning":
                logprob = np.array(s["logprob"], dtype=np.float64)
                want = bf_token_mask(
                    logprob, trainable, cfg.token_ratio, cfg.lam, cfg.token_order, cfg.token_budget, cfg.token_score
                )
                assert mask.tolist() == want
    return rows


@pytest.mark.parametrize("scope", ["global", "batch"])
def test_prune_output_contract_and_invariants(tmp_path, scores, scope):
    cfg = PruneConfig(scores=str(scores), out=str(tmp_path / "p"), ratio=0.25, scope=scope, **PER_TOKEN)
    manifest = run(cfg)
    rows = check_pruned(scores, tmp_path / "p", cfg)
    files = sorted((tmp_path / "p" / "data").glob("train-*.parquet"))
    assert len(files) > 1 and files[0].name.endswith(f"-of-{len(files):05d}.parquet")
    assert pq.read_schema(files[0]).remove_metadata().equals(schema.PRUNED)
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["N"] == 203 and stats["K"] == len(rows) == manifest["counts"]["samples_out"]
    assert sum(stats["selection"].values()) == len(rows) and sum(stats["quadrants"].values()) == 203
    assert stats["trainable_tokens"]["after"] == sum(sum(r["loss_mask"]) for r in rows)
    if scope == "global":
        assert set(stats["thresholds"]) == {"alpha", "ppl_high", "ent_low", "ppl_low", "ent_high"}
    # deterministic: a second run elsewhere writes identical data
    run(cfg.model_copy(update={"out": str(tmp_path / "q")}))
    again = pq.read_table(sorted((tmp_path / "q" / "data").glob("train-*.parquet"))).to_pylist()
    assert again == rows


def test_baseline_strategies_and_rerun_noop(tmp_path, scores):
    for strategy, token_strategy in (("random", "random"), ("ppl-high", "ppl"), ("entropy-low", "none")):
        cfg = PruneConfig(
            scores=str(scores),
            out=str(tmp_path / strategy),
            ratio=0.1,
            strategy=strategy,
            token_strategy=token_strategy,
            **PER_TOKEN,
        )
        run(cfg)
        check_pruned(scores, tmp_path / strategy, cfg)
    rec = Recorder()
    run(cfg, rec)
    assert any("nothing to do" in m for m in rec.logs)


def test_datasets_loads_and_concatenates_shards(tmp_path, scores):
    import datasets

    run(PruneConfig(scores=str(scores), out=str(tmp_path / "p"), ratio=0.5, **PER_TOKEN))
    files = sorted(str(p) for p in (tmp_path / "p" / "data").glob("train-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == pruning.budget(0.5, 203)
    for col in ("input_ids", "labels"):
        assert ds.features[col] == datasets.List(datasets.Value("int32"))
    parts = [datasets.Dataset.from_parquet(f) for f in files]
    assert len(datasets.concatenate_datasets(parts)) == len(ds)


def test_bad_inputs_are_clear_errors(tmp_path, scores):
    res = CliRunner().invoke(app, ["prune", str(scores), "--out", str(tmp_path / "x"), "--ratio", "12.5", "--lam", "2"])
    assert res.exit_code == 2 and "--ratio: is a fraction in (0, 1]: did you mean 0.125?" in res.output
    assert "--lam: Input should be less than or equal to 1" in res.output
    with pytest.raises(CurateError, match="no such folder"):
        run(PruneConfig(scores=str(tmp_path / "missing"), out=str(tmp_path / "x")))
    bad = tmp_path / "nan"
    synthetic_scores(bad, 5, mean_tokens=10, shard_size=5)
    shard = bad / "part-00000.parquet"
    t = pq.read_table(shard).to_pylist()
    t[2]["logprob"] = [float("nan")] * len(t[2]["logprob"])
    pq.write_table(pa.Table.from_pylist(t, schema=schema.SCORES), shard)
    restamp(bad)
    with pytest.raises(CurateError, match=r"sample 's00000002' has NaN scores"):
        run(PruneConfig(scores=str(bad), out=str(tmp_path / "y"), **PER_TOKEN))


def test_one_trainable_token_samples(tmp_path):
    d = tmp_path / "s"
    synthetic_scores(d, 12, mean_tokens=6, shard_size=12, seed=3)
    t = pq.read_table(d / "part-00000.parquet").to_pylist()
    for r in t:  # only the last (end-of-turn) token is trainable
        r["trainable"] = [0] * (len(r["trainable"]) - 1) + [1]
        r["n_trainable"] = 1
    pq.write_table(pa.Table.from_pylist(t, schema=schema.SCORES), d / "part-00000.parquet")
    restamp(d)
    cfg = PruneConfig(scores=str(d), out=str(tmp_path / "p"), ratio=0.5, **PER_TOKEN)
    run(cfg)
    rows = check_pruned(d, tmp_path / "p", cfg)
    assert all(sum(r["loss_mask"]) == 1 for r in rows)


@needs_shared
@pytest.mark.slow
def test_gsm8k_64_rows_builtin_model_prune_quarter(tmp_path, smollm2_gsm8k):
    """The issue's acceptance run: 64 GSM8K rows, default model, --ratio 0.25 --token-ratio 0.5."""
    (scores_dir, _), out = smollm2_gsm8k, tmp_path / "pruned"
    runner = CliRunner()
    paper = ["--token-unit", "token", "--protect", "none", "--token-order", "drop-high"]  # exactly the paper's rule
    args = ["prune", str(scores_dir), "--out", str(out), "--ratio", "0.25", "--token-ratio", "0.5", *paper]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = PruneConfig(scores=str(scores_dir), out=str(out), ratio=0.25, token_ratio=0.5, **PAPER)
    rows = check_pruned(scores_dir, out, cfg)
    assert len(rows) == 16
    # independent EU coordinates from the raw score lists, then the brute-force triage
    src = pq.read_table(sorted(scores_dir.glob("part-*.parquet"))).to_pylist()
    ids, ppl, ent = [], [], []
    for r in src:
        t = np.array(r["trainable"], bool)
        ids.append(r["id"])
        ppl.append(float(np.exp(-np.array(r["logprob"], np.float64)[t].mean())))
        ent.append(float(np.array(r["entropy"], np.float64)[t].mean()))
    assert {r["id"]: r["selection"] for r in rows} == bf_triage(ids, ppl, ent, 0.25)


def test_parallel_pass_two_writes_the_same_files(tmp_path, scores):
    cfg = PruneConfig(scores=str(scores), out=str(tmp_path / "one"), ratio=0.5, **PER_TOKEN)
    one = run(cfg)
    two = run(cfg.model_copy(update={"out": str(tmp_path / "two"), "workers": 2}))
    assert one["fingerprint"] == two["fingerprint"]  # workers do not change the result...
    same = [f for f in one["files"] if f["name"] != "stats.json"]  # stats.json records the settings, workers too
    assert same == [f for f in two["files"] if f["name"] != "stats.json"]  # ...to the byte


# ---------------------------------------------------------------- whole words, protected spans, duplicates


def masked_text(view, row):
    """The assistant text of a pruned row with [-x-] around each token out of the loss."""
    text, starts, ends, _ = view
    trainable = np.array(row["labels"]) != -100
    out = []
    for i in np.flatnonzero(np.array(row["trainable"]) == 1):
        piece = text[starts[i] : ends[i]]
        out.append(piece if trainable[i] else f"[-{piece}-]")
    return "".join(out)


def test_word_units_on_a_real_tokenizer_never_split_a_word(tiny_run):
    """Default prune on the tiny model's scores: every word and number of a pruned sample is in or out whole."""
    from transformers import AutoTokenizer

    from curate.tokenization import TokenText
    from curate.units import UNIT

    scores = {r["id"]: r for r in pq.read_table(sorted((tiny_run / "scores").glob("part-*.parquet"))).to_pylist()}
    rows = pq.read_table(sorted((tiny_run / "pruned" / "data").glob("train-*.parquet"))).to_pylist()
    manifest = json.loads((tiny_run / "scores" / "_manifest.json").read_text())
    view = TokenText(AutoTokenizer.from_pretrained(manifest["model"]["path"]))
    pruned = 0
    for r in rows:
        src = scores[r["id"]]
        trainable, mask = np.array(src["trainable"]), np.array(r["loss_mask"])
        if (mask == trainable).all():
            continue
        pruned += 1
        text, starts, ends, _ = view.spans(src["messages"], np.array(src["input_ids"], np.int32))
        for m in UNIT.finditer(text):
            inside = np.flatnonzero((starts < m.end()) & (ends > m.start()) & (trainable == 1))
            assert len(set(mask[inside].tolist())) <= 1, (m.group(), masked_text((text, starts, ends, []), src | r))
    assert pruned
    stats = json.loads((tiny_run / "pruned" / "stats.json").read_text())["token_pruning"]
    assert stats["unit"] == "word" and stats["samples"] == pruned and stats["samples_without_text"] == 0
    assert sum(stats["masked_by_kind"].values()) == stats["tokens_trainable"] - stats["tokens_kept"]
    assert stats["tokens_kept"] >= stats["tokens_budget"]


def test_identical_conversations_share_no_budget(tmp_path, tiny_model_dir):
    from curate.config import ScoreConfig
    from curate.stages import score

    rows = [
        {
            "id": f"r{i:02d}",
            "messages": [
                {"role": "user", "content": f"q {i % 6}"},
                {"role": "assistant", "content": f"the answer is {i % 6}"},
            ],
        }
        for i in range(18)
    ]  # 6 conversations, 3 copies each
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s"), model=str(tiny_model_dir)))
    rec = Recorder()
    run(PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "p"), ratio=0.5), rec)
    samples = pq.read_table(tmp_path / "p" / "samples.parquet").to_pylist()
    kept = [s["id"] for s in samples if s["kept"]]
    assert len(kept) == 3  # exactly round(0.5 * 6 distinct conversations)
    assert len({int(k[1:]) % 6 for k in kept}) == 3  # never two copies of one conversation
    copies = {s["id"]: s["duplicate_of"] for s in samples if s["duplicate_of"]}
    assert len(copies) == 12 and all(int(k[1:]) % 6 == int(v[1:]) % 6 and v < k for k, v in copies.items())
    assert json.loads((tmp_path / "p" / "stats.json").read_text())["duplicates_left_out"] == 12
    assert any("12 later copies" in m for m in rec.logs)
    run(PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "k"), ratio=0.5, keep_duplicates=True))
    again = pq.read_table(tmp_path / "k" / "samples.parquet").to_pylist()
    assert sum(s["kept"] for s in again) == 9 and not any(s["duplicate_of"] for s in again)


@needs_shared
@pytest.mark.slow
def test_defaults_keep_what_must_be_learned_on_the_shared_data(tmp_path, smollm2_dir):
    """The issue's examples, scored by the built-in model and token-pruned with the defaults (every sample pruned:
    --strategy ppl-high --ratio 1): the GSM8K answer `#### 624`, the glaive call's JSON and the word an Alpaca
    instruction asked for stay in the loss, where the paper's rule masks digits of the answer, the JSON keys and
    the asked-for word."""
    from transformers import AutoTokenizer

    from curate.config import ScoreConfig
    from curate.stages import score
    from curate.tokenization import TokenText

    from .conftest import ALPACA, GLAIVE, SHARED

    gsm8k = [json.loads(line) for line in open(SHARED / "gsm8k" / "train.jsonl")][4:5]  # ... 12*52=624 #### 624
    glaive = [json.load(open(GLAIVE))[26]]  # calls calculate_discount
    alpaca = [json.load(open(ALPACA))[370]]  # "Suggest a more interesting word": ... a glance at the lackluster report.
    view = TokenText(AutoTokenizer.from_pretrained(smollm2_dir))
    cases = (("gsm8k", gsm8k, "prompt=question,response=answer"), ("glaive", glaive, None), ("alpaca", alpaca, None))
    wanted = {
        "gsm8k": ["#### 624<|im_end|>"],
        "glaive": ['{"name": "calculate_discount", "arguments": {"'],
        "alpaca": [" lackluster"],  # the word the instruction asked for, whole and in the loss
    }
    for name, rows, fields in cases:
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps(rows))
        score.run(ScoreConfig(input=str(data), out=str(tmp_path / name), fields=fields))
        for rule, extra in (("default", {}), ("paper", PAPER)):
            out = tmp_path / f"{name}-{rule}"
            run(PruneConfig(scores=str(tmp_path / name), out=str(out), ratio=1.0, strategy="ppl-high", **extra))
            src = pq.read_table(sorted((tmp_path / name).glob("part-*.parquet"))).to_pylist()[0]
            row = pq.read_table(sorted((out / "data").glob("train-*.parquet"))).to_pylist()[0]
            shown = masked_text(view.spans(src["messages"], np.array(src["input_ids"], np.int32)), src | row)
            want = wanted[name]
            if rule == "default":
                assert all(w in shown for w in want), shown
                assert sum(row["loss_mask"]) < sum(src["trainable"])  # and it was pruned
            else:
                assert not all(w in shown for w in want), shown  # what the default fixes


def test_excluded_ids_take_no_part_and_the_budget_counts_the_others(tmp_path, scores):
    ids = pq.read_table(sorted(scores.glob("part-*.parquet")), columns=["id"])["id"].to_pylist()
    chosen = ids[::7]
    listed = tmp_path / "review.txt"
    listed.write_text("# rejected in review\n" + "\n".join(chosen) + "\n\n")
    cfg = PruneConfig(scores=str(scores), out=str(tmp_path / "p"), ratio=0.25, exclude_ids=str(listed), **PER_TOKEN)
    manifest = run(cfg)
    samples = pq.read_table(tmp_path / "p" / "samples.parquet").to_pylist()
    assert {s["id"] for s in samples if s["excluded"]} == set(chosen) and len(samples) == len(ids)
    assert not any(s["kept"] for s in samples if s["excluded"])
    assert manifest["stats"]["excluded"] == len(chosen)
    assert manifest["stats"]["K"] == pruning.budget(0.25, len(ids) - len(chosen))  # exact over the others
    listed.write_text("\n".join(chosen[1:]))  # the list changed: the run is another one, not this one's result
    with pytest.raises(StaleOutputError, match="other inputs or settings; use --force"):
        run(cfg)
    assert run(cfg, force=True)["stats"]["excluded"] == len(chosen) - 1
    listed.write_text(chosen[0] + "\nno-such-id\n")
    with pytest.raises(CurateError, match="1 of its 2 ids are not in .*'no-such-id'"):
        run(cfg, force=True)


def test_a_pruned_folder_loads_by_name_with_its_card(tmp_path, tiny_run):
    """`datasets.load_dataset(folder)` reads the card's config: the training data only, not samples.parquet."""
    import datasets

    from curate import io

    pruned = tiny_run / "pruned"
    ds = datasets.load_dataset(str(pruned), split="train")
    stats = json.loads((pruned / "stats.json").read_text())
    assert ds.num_rows == stats["K"] and {"input_ids", "labels", "loss_mask"} <= set(ds.column_names)
    card = (pruned / "README.md").read_text()
    manifest = io.verified(pruned, "pruned", "")
    assert "README.md" in {f["name"] for f in manifest["files"]}  # listed, with its checksum
    assert manifest["model"]["hash"] in card and "--ratio 0.5" in card and "--token-ratio" not in card
    assert "](eu_plane.png)" in card and "eu_plane.png" in {f["name"] for f in manifest["files"]}


def test_the_cards_picture_shows_every_sample_and_the_kept_ones_in_their_colours():
    import io as bytes_io

    import numpy as np
    from PIL import Image

    from curate.card import COLOURS, GREY, plane_picture

    ppl = np.array([2.0, 30.0, 3.0, 10.0, np.nan])  # a sample without a place is left out, not an error
    ent = np.array([2.5, 0.2, 1.0, 1.5, 1.0])
    selection = ["Q4", "Q2", None, None, None]
    png = plane_picture(ppl, ent, selection)
    assert png == plane_picture(ppl, ent, selection)  # the same bytes for the same samples
    pixels = np.asarray(Image.open(bytes_io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    counts = {name: int((pixels == colour).all(axis=1).sum()) for name, colour in {**COLOURS, "grey": GREY}.items()}
    assert counts["Q2"] == counts["Q4"] == 9 and counts["grey"] == 8 and counts["fill-Q2"] == 0
    top_left = np.asarray(Image.open(bytes_io.BytesIO(png)).convert("RGB"))[:60, :60]
    assert (top_left == COLOURS["Q4"]).all(axis=-1).any()  # low perplexity, high entropy: Q4's corner


def test_the_card_carries_the_licence_the_inputs_card_names(tmp_path, tiny_model_dir):
    from curate.config import ScoreConfig
    from curate.stages import score

    data = tmp_path / "src"
    data.mkdir()
    (data / "rows.jsonl").write_text("".join(open(DEMO).readlines()[:10]))
    (data / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# rows\n")
    score.run(ScoreConfig(input=str(data / "rows.jsonl"), out=str(tmp_path / "s"), model=str(tiny_model_dir)))
    run(PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "p"), ratio=0.5))
    assert "license: cc-by-4.0" in (tmp_path / "p" / "README.md").read_text()


@needs_shared
@pytest.mark.slow
def test_every_reply_of_a_pruned_glaive_conversation_keeps_content_and_calls_stay_whole(tmp_path, smollm2_dir):
    """Held-out glaive conversations (the last 40 rows), the built-in model, prune's defaults: in every token-pruned
    sample each free-text reply trains at least one word or number, each tool call is trained whole, and a
    conversation whose tool list is empty is rendered with no tools text."""
    from transformers import AutoTokenizer

    from curate.config import ScoreConfig
    from curate.formats import join_tools
    from curate.stages import score
    from curate.tokenization import TokenText
    from curate.units import is_tool_call

    TURN_ROLES = {"system", "user", "assistant", "tool"}  # noqa: N806

    from .conftest import GLAIVE

    rows = json.load(open(GLAIVE))[-40:]
    assert any(r["tools"] == "[]" for r in rows)
    data = tmp_path / "glaive.json"
    data.write_text(json.dumps(rows))
    score.run(ScoreConfig(input=str(data), out=str(tmp_path / "s")))
    manifest = run(PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "p"), ratio=0.5))
    tp = manifest["stats"]["token_pruning"]
    assert tp["replies"] > 0 and tp["replies_without_content"] == 0 and tp["budget"] == "turn"
    view = TokenText(AutoTokenizer.from_pretrained(smollm2_dir))
    src = {r["id"]: r for r in pq.read_table(sorted((tmp_path / "s").glob("part-*.parquet"))).to_pylist()}
    replies = calls = 0
    for r in pq.read_table(sorted((tmp_path / "p" / "data").glob("train-*.parquet"))).to_pylist():
        conversation = join_tools(r["messages"], r["tools"])  # the tool schemas are their own column
        text, starts, ends, contents = view.spans(conversation, np.array(r["input_ids"], np.int32))
        assert "You can call these tools:\n[]" not in text and {m["role"] for m in r["messages"]} <= TURN_ROLES
        if r["tools"] is None:
            assert "You can call these tools" not in text
        if r["selection"] not in ("Q2", "fill-Q2"):
            continue
        mask, trainable = np.array(r["loss_mask"]), np.array(src[r["id"]]["trainable"])
        for lo, hi in contents:
            turn = (starts >= lo) & (starts < hi) & (trainable == 1)
            try:
                call = is_tool_call(json.loads(text[lo:hi]))
            except ValueError:
                call = False
            if call:
                calls += 1
                assert mask[turn].all(), text[lo:hi]
            else:
                replies += 1
                wordy = np.array([any(c.isalnum() for c in text[a:b]) for a, b in zip(starts, ends)])
                assert (mask[turn] & wordy[turn]).any(), masked_text((text, starts, ends, None), r | src[r["id"]])
    assert replies >= 10 and calls >= 3
    # the budget over the whole sample (the paper's, the old default): the calls use it up, replies lose all content
    paper_budget = run(
        PruneConfig(scores=str(tmp_path / "s"), out=str(tmp_path / "q"), ratio=0.5, token_budget="sample")
    )
    assert paper_budget["stats"]["token_pruning"]["replies_without_content"] > 0


def test_preset_paper_is_the_papers_rule_in_one_flag(tmp_path, scores):
    """The preset sets every option of the paper's rule (the masks byte for byte those of the explicit options, the
    token rule the per-token brute force checks), the CLI and YAML take it, and options beside it still apply."""
    explicit = dict(
        token_unit="token",
        protect=[],
        token_order="drop-high",
        token_budget="sample",
        token_score="ppl",
        lam=0.5,
        placement="conversation",
        fill="minmax",
    )
    run(PruneConfig(scores=str(scores), out=str(tmp_path / "explicit"), ratio=0.25, **explicit))
    res = CliRunner().invoke(
        app,
        ["prune", str(scores), "--out", str(tmp_path / "preset"), "--ratio", "0.25", "--preset", "paper"],
        env={"COLUMNS": "300"},
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "drop the most surprising tokens (highest context-aware perplexity, lam 0.5), keep 0.5 of the" in text
    assert "preset paper: --token-unit token --protect none --token-order drop-high --token-budget sample" in text
    files = [sorted((tmp_path / d / "data").glob("train-*.parquet")) for d in ("explicit", "preset")]
    assert [pq.read_table(f).to_pylist() for f in files[0]] == [pq.read_table(f).to_pylist() for f in files[1]]
    import curate
    from curate.config import load_pipeline

    api = curate.prune(scores=scores, out=tmp_path / "api", ratio=0.25, preset="paper")
    assert api.config["token_unit"] == "token" and api.config["fill"] == "minmax"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("run_dir: r\nscore: {input: demo}\nprune: {ratio: 0.25, preset: paper}\n")
    assert load_pipeline(pipeline).prune.token_order == "drop-high"
    cfg = PruneConfig(scores=str(scores), out="x", preset="paper", lam=0.0)  # beside it: still applies
    assert cfg.lam == 0.0 and cfg.token_unit == "token" and cfg.fill == "minmax"
    check_pruned(scores, tmp_path / "preset", PruneConfig(scores=str(scores), out="x", ratio=0.25, preset="paper"))
    stats = json.loads((tmp_path / "preset" / "stats.json").read_text())
    assert (
        stats["token_pruning"]["budget"] == "sample"
        and "trainable tokens (protected ones counted" in (stats["token_pruning"]["rule"])
    )
