import re
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app

from .conftest import ROOT, write_jsonl


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("run")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"the fox {i}"},
                {"role": "assistant", "content": "jumps over the lazy dog " * (1 + i % 4) + str(i)},
            ]
        }
        for i in range(40)
    ]
    data = write_jsonl(d / "in.jsonl", rows)
    cfg = d / "p.yaml"
    cfg.write_text(f"run_dir: {d / 'run'}\nscore:\n  input: {data}\n  model: {tiny_model_dir}\nprune:\n  ratio: 0.25\n")
    res = CliRunner().invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    return d / "run"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_report_pictures_and_html(small_run):
    res = CliRunner().invoke(app, ["report", str(small_run)])
    assert res.exit_code == 0, res.output
    out = small_run / "report"
    w, h = png_size(out / "eu_plane.png")
    assert 600 <= w <= 2000 and 500 <= h <= 1500
    assert png_size(out / "histograms.png")[0] >= 800
    page = (out / "report.html").read_text()
    for section in ('id="summary"', 'id="pictures"', 'id="examples"', "data:image/png;base64,", "Q1", "Q4"):
        assert section in page
    assert 'class="pruned"' in page and 'class="kept"' in page and "logprob" in page
    assert 'id="tokens"' in page and "surprising" in page and "Masked tokens:" in page
    assert re.search(r"pruned \d+ of \d+ tokens", page) and re.search(r"kept all \d+ tokens", page)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_prune_report_flag_on_a_pruned_folder_elsewhere(small_run, tmp_path):
    res = CliRunner().invoke(
        app, ["prune", str(small_run / "scores"), "--out", str(tmp_path / "p"), "--ratio", "0.5", "--report"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "report" / "report.html").exists() and png_size(tmp_path / "p" / "report" / "eu_plane.png")


def test_inspect_shows_tokens(small_run):
    import polars as pl

    kept = pl.read_parquet(small_run / "pruned" / "samples.parquet").filter(pl.col("selection") == "Q2")
    sid = kept["id"][0] if kept.height else pl.read_parquet(small_run / "pruned" / "samples.parquet")["id"][0]
    res = CliRunner().invoke(app, ["inspect", str(small_run), "--id", sid], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "logprob" in res.output and "prompt" in res.output
    bad = CliRunner().invoke(app, ["inspect", str(small_run), "--id", "nope"])
    assert bad.exit_code == 2 and "no sample with id" in bad.output


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def test_report_in_a_real_browser(small_run):
    """report.html in Debian's Chromium, offline: the plane renders, every quadrant shown has prompt and response
    tokens in their own colours, hovering a token shows its scores; a screenshot is kept beside the report."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium not installed (`make test` installs Debian's chromium when run as root)")
    from playwright.sync_api import sync_playwright

    res = CliRunner().invoke(app, ["report", str(small_run)])
    assert res.exit_code == 0, res.output
    report = small_run / "report"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((report / "report.html").as_uri())
        plane = page.locator('img[alt="eu_plane.png"]')
        assert plane.evaluate("i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0")
        box = plane.bounding_box()
        assert box["width"] > 300 and box["height"] > 200

        def colour(locator):
            return locator.evaluate("e => getComputedStyle(e).backgroundColor")

        colours = {}
        shown = page.locator(".sample").evaluate_all("cards => cards.map(c => c.dataset.quadrant)")
        assert set(shown) == {"Q1", "Q2", "Q3", "Q4"}
        for q in sorted(set(shown)):
            cards = page.locator(f'.sample[data-quadrant="{q}"]')
            kinds = set(cards.locator("span[class]").evaluate_all("s => s.map(e => e.className)"))
            assert "prompt" in kinds and kinds & {"kept", "pruned", "dropped"}, (q, kinds)
            for kind in kinds:
                colours.setdefault(kind, set()).add(colour(cards.locator(f"span.{kind}").first))
        assert {"prompt", "kept", "pruned", "dropped"} <= set(colours), colours
        assert all(len(c) == 1 for c in colours.values())  # one colour per kind, everywhere
        assert len({c for cs in colours.values() for c in cs}) == len(colours)  # and no two kinds share one

        token = page.locator(".sample span.pruned").first
        token.hover()
        tip = page.locator("#tip")
        assert tip.is_visible()
        text = tip.inner_text()
        assert "pruned" in text and "logprob" in text and "entropy" in text and "score" in text
        page.screenshot(path=str(report / "report-hover.png"))  # the tooltip over a pruned token
        page.screenshot(path=str(report / "report.png"), full_page=True)
        browser.close()
    assert png_size(report / "report.png")[0] >= 1280
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests  # no network


def test_notebook_executes(small_run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "eu_plane.ipynb", as_version=4)
    monkeypatch.setenv("CURATE_RUN_DIR", str(small_run))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
