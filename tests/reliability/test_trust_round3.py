"""Trust, round three: each test reproduces one way a hostile user made q-curate lose, leak or misreport data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from curate.config import ExportConfig, PruneConfig
from curate.stages import export
from curate.stages.prune import run as prune
from curate.synthetic import synthetic_scores

PER_TOKEN = {"token_unit": "token", "protect": []}  # synthetic scores have no tokenizer to read text with


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    synthetic_scores(d, 16, mean_tokens=20, shard_size=8)
    return d


def ids_in(folder) -> list[str]:
    return sorted(pq.read_table(sorted((folder / "data").glob("train-*.parquet")), columns=["id"])["id"].to_pylist())


def test_a_pruned_folder_reads_back_as_itself_through_a_shared_datasets_cache(tmp_path, scores):
    """`datasets` keys a local folder's cache by its name and card, not its files: two folders named `pruned`
    read back the first one's rows, and so did a folder pruned again."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"  # one cache for every read, as a user's is
    a, b = tmp_path / "a" / "pruned", tmp_path / "b" / "pruned"
    prune(PruneConfig(scores=str(scores), out=str(a), ratio=0.25, **PER_TOKEN))
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.5, **PER_TOKEN))

    def read(folder):
        return sorted(datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))["id"])

    assert read(a) == ids_in(a) and len(ids_in(a)) == 4
    assert read(b) == ids_in(b) and len(ids_in(b)) == 8
    # pruned again into the same folder: the same number of rows, other masks
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.5, token_ratio=0.25, **PER_TOKEN), force=True)
    fresh = datasets.load_dataset(str(b), split="train", cache_dir=str(cache))
    on_disk = pq.read_table(sorted((b / "data").glob("train-*.parquet"))).to_pylist()
    assert sorted(map(tuple, fresh["loss_mask"])) == sorted(tuple(r["loss_mask"]) for r in on_disk)
    prune(PruneConfig(scores=str(scores), out=str(b), ratio=0.75, **PER_TOKEN), force=True)
    assert read(b) == ids_in(b) and len(ids_in(b)) == 12


def test_exports_read_back_their_own_rows_after_a_re_export(tmp_path, scores):
    """The TRL script and the JSONL loader load the export with `datasets`, whose cache the user's machine shares
    between runs: an export written again into the same folder must read back as the new rows."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache")}
    for fmt, script in (("trl", "train_trl.py"), ("jsonl", "load.py")):
        out = tmp_path / f"export-{fmt}"
        for ratio in (0.25, 0.5):
            pruned = tmp_path / f"pruned-{ratio}"
            prune(PruneConfig(scores=str(scores), out=str(pruned), ratio=ratio, **PER_TOKEN))
            export.run(ExportConfig(pruned=str(pruned), format=fmt, out=str(out)))
            # the script's own loading line, then the row count (the TRL script would go on to train)
            code = (out / script).read_text().split("\ngpu =")[0].replace("print(dataset)", "")
            code += "\nprint(dataset.num_rows)"
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert int(done.stdout.split()[-1]) == len(ids_in(pruned)), (fmt, ratio)


def test_the_card_names_the_data_it_describes(tmp_path, scores):
    prune(PruneConfig(scores=str(scores), out=str(tmp_path / "p"), ratio=0.25, **PER_TOKEN))
    manifest = json.loads((tmp_path / "p" / "_manifest.json").read_text())
    card = (tmp_path / "p" / "README.md").read_text()
    from curate.card import data_identity

    data = [f for f in manifest["files"] if f["name"].startswith("data/")]
    assert f"files {data_identity(data)}" in card and "num_examples: 4" in card


# ---------------------------------------------------------------- 2. push never deletes its source


@pytest.mark.parametrize("dest", ["same", "slash", "symlink", "inside", "around"])
def test_push_refuses_a_destination_that_is_or_holds_its_source(tmp_path, scores, dest):
    from curate.errors import CurateError
    from curate.publish import push

    run = tmp_path / "r"
    pruned = run / "pruned"
    prune(PruneConfig(scores=str(scores), out=str(pruned), ratio=0.5, **PER_TOKEN))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    (tmp_path / "link").symlink_to(pruned)
    target = {
        "same": str(pruned),
        "slash": f"{pruned}/",
        "symlink": str(tmp_path / "link"),
        "inside": str(pruned / "copy"),
        "around": str(run),
    }[dest]
    with pytest.raises(CurateError, match="the destination is .* itself, inside it or holds it"):
        push(str(pruned), target)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing touched


def test_push_refuses_a_bucket_destination_inside_its_source(bucket, scores):
    from curate.errors import CurateError
    from curate.publish import push

    prune(PruneConfig(scores=str(scores), out=f"{bucket}/pruned", ratio=0.5, **PER_TOKEN))
    for target in (f"{bucket}/pruned/", f"{bucket}/pruned/x", f"{bucket}//pruned", bucket):
        with pytest.raises(CurateError, match="itself, inside it or holds it"):
            push(f"{bucket}/pruned", target)


# ---------------------------------------------------------------- 3, 5, 10. cards read as the Hub reads them


def hub_folder(tmp_path, header: str, files=("data/train-00000.jsonl",)) -> str:
    root = tmp_path / "hub"
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": name}]
        (root / name).write_text(json.dumps({"messages": turns}) + "\n")
    (root / "README.md").write_text(f"---\n{header}\n---\n# A card\n\nSome text --- with dashes.\n\n---\n")
    return str(root)


def test_dashes_inside_a_card_value_keep_its_configs(tmp_path):
    from curate import readers
    from curate.card import source_card

    header = (
        "pretty_name: GSM8K --- math\nlicense: 'mit --- see below'\nconfigs:\n- config_name: default\n"
        "  data_files:\n  - split: train\n    path: picked/*.jsonl"
    )
    root = hub_folder(tmp_path, header, ("data/train-00000.jsonl", "picked/a.jsonl"))
    assert [p.rsplit("/", 1)[1] for p in readers.resolve(root).files] == ["a.jsonl"]  # the card's files, not data/
    assert source_card(root)["license"] == "mit --- see below"


@pytest.mark.parametrize("path", ["../outside/*.jsonl", "/etc/*", "s3://elsewhere/x.jsonl", "data/../../outside/*"])
def test_a_cards_data_files_stay_inside_the_dataset(tmp_path, path):
    from curate import readers
    from curate.errors import CurateError

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text("{}\n")
    header = f"configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {json.dumps(path)}"
    root = hub_folder(tmp_path, header)
    with pytest.raises(CurateError, match="outside the dataset folder"):
        readers.resolve(root)


def test_a_cards_data_files_may_not_leave_through_a_symlink(tmp_path):
    from curate import readers
    from curate.errors import CurateError

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text("{}\n")
    root = hub_folder(tmp_path, "configs:\n- config_name: default\n  data_files: link/*.jsonl")
    (tmp_path / "hub" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(CurateError, match="lies outside the dataset folder"):
        readers.resolve(root)


def test_a_billion_laughs_card_is_a_one_line_error(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    root = hub_folder(tmp_path, laughs + "configs: [*i]")
    res = CliRunner().invoke(app, ["score", root, "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "README.md: the card's YAML header is not valid" in res.output, res.output
    assert "alias" in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- 4. credentials never recorded

SECRET = "SENTINEL-s3cr3t-4e1f"


def secret_argv(out: str) -> list[str]:
    options = json.dumps({"s3": {"key": "testing", "secret": SECRET}})
    return ["curate", "--storage-options", options, "prune", "SCORES", "--out", out, "s3://KEY:" + SECRET + "@b/x"]


def test_locks_record_no_secret_and_print_none(tmp_path, monkeypatch):
    from curate import io, redact
    from curate.errors import CurateError

    monkeypatch.setattr(sys, "argv", secret_argv(str(tmp_path / "out")))
    assert SECRET not in redact.command_line() and "--storage-options <redacted>" in redact.command_line()
    folder = tmp_path / "out"
    code = (
        "import sys, time\n"
        f"sys.argv = {secret_argv(str(folder))!r}\n"
        "from curate import io\nfrom pathlib import Path\n"
        f"with io.locked(Path({str(folder)!r})):\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        held = (folder / ".curate.lock").read_text()
        assert SECRET not in held and "prune" in held
        # the next user wants the folder: the message names the holder's command, no secret in it
        with pytest.raises(CurateError, match="is in use by process") as refused:
            with io.locked(folder):
                pass
        assert SECRET not in str(refused.value) and "--storage-options <redacted>" in str(refused.value)
    finally:
        holder.kill()  # kill -9: the lock stays behind, and it names no secret either
        holder.wait()
    assert SECRET not in (folder / ".curate.lock").read_text()
    # a lock an earlier version wrote with the secret inside is printed without it
    old = " ".join(secret_argv("o"))
    assert SECRET not in redact.text(old) and "prune SCORES --out o" in redact.text(old)


def test_a_killed_bucket_run_leaves_a_lock_without_secrets(tmp_path, bucket, s3_server):
    """kill -9 while holding a bucket's lock object: what stays in the bucket names no secret."""
    code = (
        "import sys, time\n"
        f"sys.argv = {secret_argv(bucket + '/out')!r}\n"
        "from curate.storage import RemoteFolder\n"
        f"with RemoteFolder({bucket + '/out'!r}).locked():\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    env = {**os.environ, "CURATE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        from curate import storage

        fs, root = storage.filesystem(bucket + "/out")
        live = fs.cat_file(f"{root}/.curate.lock").decode()
        assert SECRET not in live and "prune" in live
    finally:
        proc.kill()  # kill -9: the lock object stays behind
        proc.wait()
    fs.invalidate_cache()
    left = fs.cat_file(f"{root}/.curate.lock").decode()
    assert SECRET not in left


def test_storage_options_from_a_file_keep_the_secret_off_the_command_line(tmp_path, bucket, s3_server, monkeypatch):
    from typer.testing import CliRunner

    from curate import storage
    from curate.cli import app

    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps({"s3": {"endpoint_url": s3_server["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}})
    )
    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    scores = tmp_path / "scores"
    synthetic_scores(scores, 8, mean_tokens=12)
    res = CliRunner().invoke(
        app,
        [
            "--storage-options",
            f"@{creds}",
            "prune",
            str(scores),
            "--out",
            f"{bucket}/p",
            "--token-unit",
            "token",
            "--protect",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "testing" not in res.output
    res = CliRunner().invoke(app, ["--storage-options", "@/no/such/file.json", "verify", f"{bucket}/p"])
    assert res.exit_code == 2 and "cannot read /no/such/file.json" in res.output


# ---------------------------------------------------------------- 6, 7, 8. the explorer


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_model_dir):
    """A run whose text holds `<!--` then `<script>`: the sequence that sends the HTML parser into its escaped
    script state."""
    from curate.config import ScoreConfig
    from curate.stages import score

    d = tmp_path_factory.mktemp("hostile")
    rows = [
        {
            "id": f"r{i:02d}",
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {
                    "role": "assistant",
                    "content": ("see <!-- and <script>alert(1)</script> here " if i == 3 else "")
                    + "jumps over the lazy dog " * (1 + i % 3),
                },
            ],
        }
        for i in range(20)
    ]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score.run(ScoreConfig(input=str(d / "in.jsonl"), out=str(d / "scores"), model=str(tiny_model_dir), shard_size=5))
    prune(PruneConfig(scores=str(d / "scores"), out=str(d / "pruned"), ratio=1.0))
    return d


def http(url: str, host: str | None = None):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_explorer_answers_only_requests_addressed_to_itself(hostile_run):
    from curate.explore import serve_in_background

    server, url = serve_in_background(hostile_run)
    try:
        port = server.server_address[1]
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", f"localhost:{port + 1}"):
            status, body = http(url + "api/ids", host)
            assert status == 403 and b"r00" not in body, host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert http(url + "api/ids", host)[0] == 200, host
    finally:
        server.shutdown()
        server.server_close()


def test_a_score_shard_deleted_while_the_explorer_serves_is_a_clear_error(hostile_run, tmp_path):
    import shutil

    from curate.explore import serve_in_background

    run = tmp_path / "copy"
    shutil.copytree(hostile_run, run)
    logged = []
    server, url = serve_in_background(run, log=logged.append)
    try:
        shard = sorted((run / "scores").glob("part-*.parquet"))[0]
        shard.unlink()
        status, body = http(url + "api/sample?id=r00")
        assert status == 500 and shard.name in json.loads(body)["error"]
        assert logged and shard.name in logged[0]
        assert http(url + "api/plane")[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()


def test_text_that_opens_an_html_comment_and_a_script_cannot_kill_the_page(hostile_run, tmp_path):
    """In Chromium: the self-contained explorer page renders and shows the hostile text as text."""
    from typer.testing import CliRunner

    from curate.cli import app

    from ..test_explore import chromium_page, needs_chromium

    chromium = needs_chromium()
    res = CliRunner().invoke(app, ["report", str(hostile_run / "pruned"), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    page_text = (tmp_path / "report" / "explore.html").read_text()
    assert "<!--" not in page_text.split("/*INLINE*/")[0][-200:]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page = chromium_page(p, chromium)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "report" / "explore.html").as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.fill("#search", "r03")
        page.press("#search", "Enter")
        page.wait_for_selector("#sample[data-id='r03']")
        shown = page.locator("#sample .tokens").text_content()
        assert "<script>alert(1)</script>" in shown and not errors
        report = browser.new_page()
        report.goto((tmp_path / "report" / "report.html").as_uri())
        assert report.locator("h1").count() >= 1
        browser.close()


# ---------------------------------------------------------------- 9, 11, 12. prune's inputs


def test_a_protect_regex_that_backtracks_without_end_is_stopped_and_named(tmp_path, tiny_model_dir):
    import time

    from curate.config import ScoreConfig
    from curate.errors import CurateError
    from curate.stages import score

    rows = [{"id": "long", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a" * 200}]}]
    (tmp_path / "in.jsonl").write_text(json.dumps(rows[0]) + "\n")
    score.run(ScoreConfig(input=str(tmp_path / "in.jsonl"), out=str(tmp_path / "s"), model=str(tiny_model_dir)))
    started = time.monotonic()
    with pytest.raises(CurateError, match=r"--protect-regex '\(a\|aa\)\+b' ran over 1 s on sample 'long'"):
        prune(
            PruneConfig(
                scores=str(tmp_path / "s"),
                out=str(tmp_path / "p"),
                ratio=1.0,
                strategy="random",
                protect_regex="(a|aa)+b",
            )
        )
    assert time.monotonic() - started < 60


def test_an_exclude_ids_file_with_a_byte_order_mark_is_read(tmp_path, scores):
    ids = sorted(pq.read_table(sorted(scores.glob("part-*.parquet")), columns=["id"])["id"].to_pylist())
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(ids[:3]) + "\n", encoding="utf-8-sig")  # as Windows editors save UTF-8
    manifest = prune(PruneConfig(scores=str(scores), out=str(tmp_path / "p"), exclude_ids=str(listed), **PER_TOKEN))
    assert manifest["stats"]["excluded"] == 3


def test_a_group_made_of_copies_says_why_it_keeps_nothing(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    conversation = lambda i: [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i} b c"}]
    rows = [{"id": f"m{i}", "source": "math", "messages": conversation(i)} for i in range(12)]
    rows += [{"id": f"z{i}", "source": "code", "messages": conversation(i)} for i in range(4)]  # copies of m0..m3
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = CliRunner()
    args = ["score", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir)]
    assert cli.invoke(app, [*args, "--keep-fields", "source"]).exit_code == 0
    res = cli.invoke(
        app,
        [
            "prune",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "p"),
            "--group-by",
            "source",
            "--group-ratios",
            "code:1.0",
        ],
    )
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    code = stats["groups"]["code"]
    assert code["K"] == 0 and code["duplicates_left_out"] == 4 and code["duplicates_of_other_groups"] == 4
    text = " ".join(res.output.split())
    assert "group code: kept 0 of 4 (ratio 1.0); 4 of its rows are later copies of identical conversations" in text


# ---------------------------------------------------------------- 13. messages name what the user typed


def test_bucket_runs_name_the_urls_the_user_typed(tmp_path, bucket, scores, monkeypatch):
    from typer.testing import CliRunner

    from curate.cli import app

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    cli = CliRunner()
    args = ["--token-unit", "token", "--protect", "none"]
    res = cli.invoke(app, ["prune", str(scores), "--out", f"{bucket}/run/pruned", *args])
    assert res.exit_code == 0 and f"pruned data: {bucket}/run/pruned/data/train-*.parquet" in res.output, res.output
    assert "staging" not in res.output and "s3:/b" not in res.output.replace("s3://", "")
    res = cli.invoke(app, ["prune", f"{bucket}/run/pruned", "--out", f"{bucket}/run/again"])
    assert res.exit_code == 2 and f"error: {bucket}/run/pruned holds the output of `curate prune`" in res.output
    res = cli.invoke(app, ["prune", str(scores), "--out", "s3://no-such-bucket-x/run", *args])
    assert res.exit_code == 2 and "s3://no-such-bucket-x/run: cannot write there" in res.output, res.output
    res = cli.invoke(app, ["prune", "s3://no-such-bucket-x/scores", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "s3://no-such-bucket-x/scores: The specified bucket does not exist" in res.output
    res = cli.invoke(app, ["score", f"{bucket}/none.jsonl", "--out", f"{bucket}/s"])
    assert res.exit_code == 2 and f"error: {bucket}/none.jsonl: no such file or folder" in res.output
    assert "staging" not in res.output


# ---------------------------------------------------------------- #36: verify names what no manifest lists


def test_verify_names_a_file_no_manifest_lists(tmp_path, scores):
    from typer.testing import CliRunner

    from curate.cli import app

    pruned = tmp_path / "run" / "pruned"
    prune(PruneConfig(scores=str(scores), out=str(pruned), ratio=0.5, **PER_TOKEN))
    res = CliRunner().invoke(app, ["verify", str(pruned)])
    assert res.exit_code == 0, res.output
    (pruned / "notes.txt").write_text("my notes")
    (pruned / "data" / "extra.json").write_text("{}")
    (tmp_path / "run" / "readme.txt").write_text("beside the stage folders")
    for where in (pruned, tmp_path / "run"):
        res = CliRunner().invoke(app, ["verify", str(where)], env={"COLUMNS": "400"})
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "notes.txt" in text and "extra.json" in text, res.output
        # the reason, however the table wraps its cell (the width of the temporary path decides where)
        assert "nomanifestliststhisfile" in re.sub(r"[\s│┃]", "", res.output)
    assert "readme.txt" in " ".join(CliRunner().invoke(app, ["verify", str(tmp_path / "run")]).output.split())
