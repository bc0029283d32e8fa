import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app

from .conftest import ROOT, write_jsonl


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("run")
    rows = [{"messages": [{"role": "user", "content": f"the fox {i}"},
                          {"role": "assistant", "content": "jumps over the lazy dog " * (1 + i % 4) + str(i)}]}
            for i in range(40)]
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
    assert "http://" not in page and "https://" not in page  # self-contained


def test_prune_report_flag_on_a_pruned_folder_elsewhere(small_run, tmp_path):
    res = CliRunner().invoke(app, ["prune", str(small_run / "scores"), "--out", str(tmp_path / "p"), "--ratio", "0.5",
                                   "--report"])
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


def test_report_opens_in_headless_chromium(small_run):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium not installed (Debian package `chromium`); the HTML checks above still ran")
    CliRunner().invoke(app, ["report", str(small_run)])
    page = small_run / "report" / "report.html"
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "q-curate report" in res.stdout


def test_notebook_executes(small_run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "eu_plane.ipynb", as_version=4)
    monkeypatch.setenv("CURATE_RUN_DIR", str(small_run))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
