"""`curate explore`: the EU plane of every sample in Chromium, from a point to its tokens, and a server that
serves nothing but its page, its library and the run's data, on 127.0.0.1 only."""

import json
import shutil
import urllib.error
import urllib.request

import polars as pl
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.explore import serve_in_background

from .conftest import ROOT, write_jsonl
from .test_report import CHROMIUM_ARGS

HOSTILE = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """60 rows in two groups, one id, one text and one group name spelling markup."""
    d = tmp_path_factory.mktemp("explore")
    rows = [
        {
            "id": HOSTILE if i == 7 else f"r{i:03d}",
            "source": HOSTILE if i % 5 == 0 else ("math" if i % 2 else "chat"),
            "messages": [
                {"role": "user", "content": f"the fox {i} {HOSTILE if i == 3 else ''}"},
                {"role": "assistant", "content": "jumps over the lazy dog " * (1 + i % 4) + str(i)},
            ],
        }
        for i in range(60)
    ]
    data = write_jsonl(d / "in.jsonl", rows)
    cli = CliRunner()
    args = ["score", str(data), "--out", str(d / "scores"), "--model", str(tiny_model_dir), "--keep-fields", "source"]
    assert cli.invoke(app, args).exit_code == 0
    res = cli.invoke(app, ["prune", str(d / "scores"), "--out", str(d / "pruned"), "--group-by", "source"])
    assert res.exit_code == 0, res.output
    return d


@pytest.fixture(scope="module")
def server(run):
    server, url = serve_in_background(run)
    yield url
    server.shutdown()
    server.server_close()


def get(url):
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_server_listens_on_localhost_and_serves_only_its_own_things(server, run):
    assert server.startswith("http://127.0.0.1:")
    status, body = get(server + "api/plane")
    assert status == 200 and json.loads(body)["n"] == 60
    for path in ("../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "plotly.js/../../pruned/stats.json", "scores"):
        status, body = get(server + path)
        assert status == 404 and b"root:" not in body and b"alpha" not in body, path
    status, _ = get(server + "api/sample?id=../../etc/passwd")
    assert status == 404
    status, _ = get(server + "api/column/..%2fstats")
    assert status == 404


ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots a person can look at after the run (git ignores them)


def chromium_page(p, chromium):
    browser = p.chromium.launch(executable_path=chromium, args=[*CHROMIUM_ARGS, "--enable-unsafe-swiftshader"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)


def exercise(page, samples, tmp_path, name: str) -> None:
    """What a user does on the page: hover, click, filter, search, select and download; screenshots kept."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    assert page.locator("#status").text_content().startswith("showing 60 of 60 samples")
    page.screenshot(path=str(ARTIFACTS / f"{name}-plane.png"))

    # hover a kept point: the tooltip names it and shows the start of its response
    target = samples.filter(pl.col("kept")).row(0, named=True)
    x, y = page.evaluate(
        """([ppl, ent]) => { const gd = document.getElementById('plane'), L = gd._fullLayout;
             const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
             return [box.left + L.xaxis.l2p(Math.log10(ppl)), box.top + L.yaxis.l2p(ent)]; }""",
        [target["ppl"], target["ent"]],
    )
    page.mouse.move(x, y)
    page.wait_for_selector("#tip", state="visible")
    assert page.locator("#tip").text_content().splitlines()[0] == target["id"]
    page.wait_for_function("document.getElementById('tip').textContent.includes('jumps over')")

    # click it: its tokens, with their kinds and scores
    page.mouse.click(x, y)
    page.wait_for_selector(f"#sample[data-id='{target['id']}']")
    page.wait_for_selector(f"#plane[data-chosen='{target['id']}']")  # and the plane points to it
    assert page.locator("#plane .annotation-text").first.text_content() == "shown below"
    kinds = set(page.locator("#sample .tokens span").evaluate_all("s => s.map(e => e.className)"))
    assert {"prompt", "kept"} <= kinds
    assert "logprob" in page.locator("#sample .tokens span.kept").first.get_attribute("title")
    page.screenshot(path=str(ARTIFACTS / f"{name}-sample.png"))

    # filter to Q2: the points drawn are the Q2 samples
    for q in ("Q1", "Q3", "Q4"):
        page.uncheck(f"#q-{q}")
    assert page.locator("#plane").get_attribute("data-shown") == str(samples.filter(pl.col("quadrant") == "Q2").height)
    for q in ("Q1", "Q3", "Q4"):
        page.check(f"#q-{q}")

    # search: an id opens it; a text finds the samples that contain it
    page.fill("#search", "r042")
    page.press("#search", "Enter")
    page.wait_for_selector("#sample[data-id='r042']")
    page.fill("#search", "the fox 11 ")
    page.press("#search", "Enter")
    page.wait_for_selector("#results li")
    assert page.locator("#results li").all_text_contents() == ["r011"]

    # box-select the whole plane, download the ids: one per line, ready for prune --exclude-ids
    page.evaluate("Plotly.relayout('plane', {dragmode: 'select'})")
    box = page.locator("#plane .nsewdrag").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=8)
    page.mouse.up()
    page.wait_for_selector("#download:not([disabled])")
    with page.expect_download() as download:
        page.click("#download")
    download.value.save_as(tmp_path / f"{name}-ids.txt")
    assert sorted((tmp_path / f"{name}-ids.txt").read_text().splitlines()) == sorted(samples["id"].to_list())

    # markup in ids, text and group names is text: nothing ran
    page.fill("#search", HOSTILE)
    page.press("#search", "Enter")
    page.wait_for_selector("#sample h3")
    assert page.locator("#sample h3").text_content() == HOSTILE
    assert page.evaluate("window.__pwned") is None and page.locator("img[src='x']").count() == 0
    page.screenshot(path=str(ARTIFACTS / f"{name}-search.png"))


def needs_chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium not installed (`make test` installs Debian's chromium when run as root)")
    return chromium


def test_the_explorer_in_chromium(server, run, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = needs_chromium()
    with sync_playwright() as p:
        browser, page = chromium_page(p, chromium)
        elsewhere = []
        page.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith(server) else None)
        page.goto(server)
        exercise(page, pl.read_parquet(run / "pruned" / "samples.parquet"), tmp_path, "explore")
        browser.close()
    assert not elsewhere  # no CDN, nothing from anywhere else


def test_the_report_carries_the_same_page_self_contained(run, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = needs_chromium()
    res = CliRunner().invoke(app, ["report", str(run / "pruned"), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert 'href="explore.html"' in (tmp_path / "report" / "report.html").read_text()
    with sync_playwright() as p:
        browser, page = chromium_page(p, chromium)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "report" / "explore.html").as_uri())
        exercise(page, pl.read_parquet(run / "pruned" / "samples.parquet"), tmp_path, "report-explore")
        browser.close()
    assert all(u.startswith(("file://", "blob:")) for u in requests), requests  # offline: nothing fetched


def test_a_large_run_points_the_report_to_curate_explore(monkeypatch, run, tmp_path):
    monkeypatch.setattr("curate.stages.report.INLINE_LIMIT", 10)
    res = CliRunner().invoke(app, ["report", str(run / "pruned"), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert "curate explore RUN</code> shows them all" in (tmp_path / "report" / "report.html").read_text()
    assert not (tmp_path / "report" / "explore.html").exists()


def test_a_busy_port_is_a_one_line_error(server, run):
    port = server.rsplit(":", 1)[1].strip("/")
    res = CliRunner().invoke(app, ["explore", str(run), "--port", port])
    assert res.exit_code == 2 and f"--port {port}: Address already in use" in res.output
