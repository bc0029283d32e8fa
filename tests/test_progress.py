"""Progress in a log: plain lines at a steady interval, an early estimate, the totals at the end."""

from typer.testing import CliRunner

from curate.cli import app
from curate.progress import LineReporter

from .conftest import DEMO


def test_lines_at_a_steady_interval_with_an_early_estimate():
    now, lines = [0.0], []
    rep = LineReporter(lines.append, interval=30, early=5, clock=lambda: now[0])
    rep.start("score", 1000)
    for t, done in ((1, 100), (2, 150), (6, 200), (20, 400), (36, 600), (50, 800), (66, 1000)):
        now[0] = t
        rep.advance(done, tokens=done * 50)
    rep.finish()
    # resumed 100 rows are no rate, and the first batch (to t=2) paid for the warm-up: estimates start after it
    assert lines == [
        "score: estimate: 200/1,000 rows (20%), 12.5 rows/s, 625 tokens/s, ETA 1m 4s",
        "score: 600/1,000 rows (60%), 13.2 rows/s, 662 tokens/s, ETA 30s",
        "score: 1,000/1,000 rows (100%), 13.3 rows/s, 664 tokens/s, ETA 0s",
        "score: done: 1,000/1,000 rows (100%), 13.6 rows/s, 682 tokens/s, 1m 6s",
    ]


def test_the_first_estimate_leaves_the_warm_up_out():
    """A model that takes 60 s to load, then 10 rows/s: the first estimate says 10 rows/s, not 1.6."""
    now, lines = [0.0], []
    rep = LineReporter(lines.append, interval=1000, early=5, clock=lambda: now[0])
    rep.start("score", 1000)
    rep.advance(0)
    for t, done in ((60, 10), (61, 20), (62, 30)):
        now[0] = t
        rep.advance(done, tokens=done * 100)
    assert lines == ["score: estimate: 20/1,000 rows (2%), 10.0 rows/s, 1,000 tokens/s, ETA 1m 38s"]


def test_the_cli_writes_progress_lines_when_its_output_is_a_log(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "0")
    args = ["score", str(DEMO), "--out", str(tmp_path / "s"), "--model", str(tiny_model_dir), "--limit", "12"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "score: done: 12/12 rows (100%)" in res.output and "tokens/s" in res.output


def test_the_config_export_prints_can_be_pasted_from_a_log(tiny_run, tmp_path):
    out = tmp_path / ("a-long-folder-name-" * 6) / "export"
    res = CliRunner().invoke(app, ["export", str(tiny_run / "pruned"), "--format", "trl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f'# python "{out / "train_trl.py"}"' in res.output.splitlines()  # one line, not wrapped at 80 columns
