"""`curate report RUN_DIR`: the EU plane as pictures and a self-contained HTML page.

Reads RUN_DIR/pruned (samples.parquet, stats.json, data/) and RUN_DIR/scores; writes eu_plane.png,
histograms.png and report.html (images embedded, no network) into RUN_DIR/report by default. A refresh run
folder gets its last round's pictures and the quadrant transition tables between rounds.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from .. import io, pruning
from ..errors import CurateError

COLORS = {"Q2": "#d62728", "fill-Q2": "#ff9896", "Q4": "#1f77b4", "fill-Q4": "#aec7e8"}
QUADRANT_NAMES = {"Q1": "harmful noise", "Q2": "valuable misconception", "Q3": "redundant knowledge",
                  "Q4": "calibration data"}


def load_run(run_dir: Path, pruned: Path | None = None) -> tuple[Path, Path, pl.DataFrame, dict]:
    """(pruned dir, scores dir, samples, stats) of a run folder, or of a pruned folder given directly."""
    pruned = pruned or run_dir / "pruned"
    scores = run_dir / "scores"
    if pruned != run_dir / "pruned" and (pruned / io.MANIFEST).exists():
        scores = Path(io.read_json(pruned / io.MANIFEST)["config"]["scores"])  # where prune read its scores
    for need in (pruned / "samples.parquet", pruned / "stats.json", scores / io.MANIFEST):
        if not need.exists():
            raise CurateError(f"{need} is missing; run `curate score` and `curate prune` into RUN_DIR/scores and "
                              "RUN_DIR/pruned first (as `curate run` and `curate demo` do)")
    return pruned, scores, pl.read_parquet(pruned / "samples.parquet"), io.read_json(pruned / "stats.json")


def plot_eu_plane(samples: pl.DataFrame, stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.log(samples["ppl"].to_numpy())
    y = samples["ent"].to_numpy()
    sel = samples["selection"].to_list()
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    if len(x) > 3000:
        ax.hexbin(x, y, gridsize=60, cmap="Greys", bins="log", mincnt=1)
    else:
        dropped = np.array([s is None for s in sel])
        ax.scatter(x[dropped], y[dropped], s=10, c="#999999", alpha=0.6, label=f"dropped ({dropped.sum():,})")
    for name, color in COLORS.items():
        m = np.array([s == name for s in sel])
        if m.any():
            ax.scatter(x[m], y[m], s=22, c=color, edgecolors="black", linewidths=0.3, label=f"kept {name} ({m.sum():,})")
    med = stats["medians"]
    ax.axvline(np.log(med["ppl"]), color="black", ls="--", lw=1, label="medians")
    ax.axhline(med["ent"], color="black", ls="--", lw=1)
    th = stats.get("thresholds")
    if th and th["alpha"] < 0.5:
        for v in (th["ppl_high"], th["ppl_low"]):
            ax.axvline(np.log(v), color="#2ca02c", ls=":", lw=1.2)
        for v in (th["ent_low"], th["ent_high"]):
            ax.axhline(v, color="#2ca02c", ls=":", lw=1.2)
        ax.plot([], [], color="#2ca02c", ls=":", label=f"alpha = {th['alpha']:.3f} thresholds")
    counts = stats["quadrants"]
    corners = {"Q1": (0.98, 0.98, "right", "top"), "Q2": (0.98, 0.02, "right", "bottom"),
               "Q3": (0.02, 0.02, "left", "bottom"), "Q4": (0.02, 0.98, "left", "top")}
    for q, (cx, cy, ha, va) in corners.items():
        ax.text(cx, cy, f"{q} {QUADRANT_NAMES[q]}\n{counts[q]:,} samples", transform=ax.transAxes, ha=ha, va=va,
                fontsize=10, bbox=dict(boxstyle="round", fc="white", ec="#cccccc", alpha=0.9))
    ax.set_xlabel("log perplexity of the response (error)")
    ax.set_ylabel("mean predictive entropy, nats (uncertainty)")
    ax.set_title(f"EU plane: kept {stats['K']:,} of {stats['N']:,} samples ({stats['sample_ratio']:.1%})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(samples: pl.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = samples.filter(pl.col("kept"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    for ax, (col, label, transform) in zip(axes, (("ppl", "log perplexity", np.log), ("ent", "mean entropy (nats)", None),
                                                  ("n_trainable", "trainable tokens per sample", None))):
        before = samples[col].to_numpy().astype(float)
        after = kept[col].to_numpy().astype(float)
        if transform is not None:
            before, after = transform(before), transform(after)
        bins = np.histogram_bin_edges(before, bins=30)
        ax.hist(before, bins=bins, color="#bbbbbb", label=f"all ({len(before):,})")
        ax.hist(after, bins=bins, color="#d62728", alpha=0.8, label=f"kept ({len(after):,})")
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def token_view(tokenizer, score_row: dict, pruned_row: dict | None, lam: float) -> str:
    """One sample as HTML spans: prompt, kept loss tokens and pruned tokens, with scores on hover."""
    ids, trainable = score_row["input_ids"], np.asarray(score_row["trainable"], dtype=np.int8)
    lp = np.asarray(score_row["logprob"], dtype=np.float32)
    ent = np.asarray(score_row["entropy"], dtype=np.float32)
    s = pruning.context_scores(np.nan_to_num(lp), trainable, lam)
    mask = np.asarray(pruned_row["loss_mask"]) if pruned_row else trainable
    parts = []
    for i, tid in enumerate(ids):
        text = tokenizer.decode([tid])
        kind = "prompt" if not trainable[i] else ("kept" if mask[i] else "pruned")
        title = f"token {i} id {tid}&#10;logprob {lp[i]:.3f}&#10;entropy {ent[i]:.3f}"
        if trainable[i]:
            title += f"&#10;score {s[i]:.3g}"
        parts.append(f'<span class="{kind}" title="{title}">{html.escape(text)}</span>')
    return "".join(parts)


def examples(samples: pl.DataFrame, per_quadrant: int) -> list[dict]:
    """A few samples per quadrant; Q2 examples are taken from the kept ones, which carry pruned tokens."""
    chosen = []
    for q in ("Q1", "Q2", "Q3", "Q4"):
        part = samples.filter(pl.col("quadrant") == q).sort(["kept", "id"], descending=[True, False])
        chosen += part.head(per_quadrant).to_dicts()
    return chosen


def refresh_html(summary: dict) -> str:
    """The rounds of a refresh run and, between consecutive rounds, how samples moved between quadrants."""
    quads = ("Q1", "Q2", "Q3", "Q4")
    head = "".join(f"<th>{q} (kept)</th>" for q in quads)
    rounds = "".join(
        f"<tr><td>{r['round']}</td><td>{html.escape(r['model'])}</td>"
        + "".join(f"<td>{r['quadrants'][q]:,} ({r['kept_by_quadrant'][q]:,})</td>" for q in quads)
        + f"<td>{r['K']:,} / {r['N']:,}</td><td>{r['loss_token_ratio']:.1%}</td></tr>" for r in summary["rounds"])
    parts = [f"<table><tr><th>round</th><th>scored by</th>{head}<th>kept</th><th>loss tokens</th></tr>{rounds}</table>"]
    for t in summary["transitions"]:
        cols = "".join(f"<th>{q} in round {t['to']}</th>" for q in quads)
        body = "".join(f"<tr><th>{q} in round {t['from']}</th>" + "".join(f"<td>{t['counts'][q][p]:,}</td>" for p in quads)
                       + "</tr>" for q in quads)
        parts.append(f'<h3>Round {t["from"]} &rarr; {t["to"]}</h3><table class="transitions"><tr><th></th>{cols}</tr>'
                     f"{body}</table><p>{t['stayed']:,} of {t['samples']:,} samples stayed in their quadrant; "
                     f"{t['kept_both']:,} were kept in both rounds.</p>")
    return '<h2 id="refresh">Refresh rounds</h2>' + "".join(parts)


def build_html(stats: dict, images: dict[str, bytes], sample_html: list[tuple[dict, str]],
               refresh: dict | None = None) -> str:
    rows = "".join(f"<tr><td>{q}</td><td>{QUADRANT_NAMES[q]}</td><td>{stats['quadrants'][q]:,}</td>"
                   f"<td>{stats['kept_by_quadrant'][q]:,}</td></tr>" for q in ("Q1", "Q2", "Q3", "Q4"))
    tok = stats["trainable_tokens"]
    summary = (f"<p>Kept <b>{stats['K']:,}</b> of {stats['N']:,} samples ({stats['sample_ratio']:.1%}); "
               f"selection {html.escape(json.dumps(stats['selection']))}. Loss tokens {tok['after']:,} of "
               f"{tok['all_samples']:,} trainable ({stats['loss_token_ratio']:.1%}).</p>")
    imgs = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                   f"<figcaption>{name}</figcaption></figure>" for name, data in images.items())
    cards = "".join(
        f'<div class="sample"><h3>{html.escape(str(s["id"]))} &middot; {s["quadrant"]} &middot; '
        f'{s["selection"] or "dropped"} &middot; ppl {s["ppl"]:.2f}, ent {s["ent"]:.3f}</h3><pre>{body}</pre></div>'
        for s, body in sample_html)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>q-curate report</title><style>
body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}} img{{max-width:100%}} pre{{white-space:pre-wrap;font-size:13px}}
.prompt{{color:#777}} .kept{{background:#c7f0c2}} .pruned{{background:#f7b6b6;text-decoration:line-through}}
.sample{{border:1px solid #ddd;border-radius:6px;padding:0 1em;margin:1em 0}}
</style></head><body>
<h1>q-curate report</h1>{refresh_html(refresh) if refresh else ""}
<h2 id="summary">Summary{" of the last round" if refresh else ""}</h2>{summary}
<table><tr><th>quadrant</th><th>meaning</th><th>samples</th><th>kept</th></tr>{rows}</table>
<p>alpha {stats.get('alpha')}, thresholds {html.escape(json.dumps(stats.get('thresholds')))}</p>
<h2 id="pictures">Pictures</h2>{imgs}
<h2 id="examples">Examples</h2>
<p>Legend: <span class="prompt">prompt (context)</span> <span class="kept">kept loss token</span>
<span class="pruned">pruned token</span>. Hover a token for its log-prob, entropy and pruning score.</p>
{cards}</body></html>"""


def scoring_tokenizer(scores: Path):
    """The tokenizer of the model that wrote `scores`, as its manifest records it."""
    from ..models import ResolvedModel, load_tokenizer

    model = io.read_json(scores / io.MANIFEST)["model"]
    return load_tokenizer(ResolvedModel(model["path"], model["name"], model["hash"]))


def rows_by_id(paths: list[Path], ids: list[str], columns: list[str] | None = None) -> dict[str, dict]:
    """The rows of these Parquet shards whose id is in `ids` (pushed down to the reader as a filter)."""
    return {r["id"]: r for path in paths
            for r in pq.read_table(path, columns=columns, filters=[("id", "in", ids)]).to_pylist()}


def run(run_dir: Path, out: Path | None = None, per_quadrant: int = 3, pruned_dir: Path | None = None) -> Path:
    """Write the report of RUN_DIR (scores/ + pruned/), or of `pruned_dir` and the scores it was made from.
    For a refresh run (RUN_DIR/refresh.json) the pictures show the last round, with the transition tables."""
    out = out or (pruned_dir / "report" if pruned_dir else run_dir / "report")
    refresh = None
    if pruned_dir is None and (run_dir / "refresh.json").exists():
        refresh = io.read_json(run_dir / "refresh.json")
        run_dir = run_dir / refresh["rounds"][-1]["dir"]
    pruned, scores, samples, stats = load_run(run_dir, pruned_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_eu_plane(samples, stats, out / "eu_plane.png")
    plot_histograms(samples, out / "histograms.png")
    tokenizer = scoring_tokenizer(scores)
    picks = examples(samples, per_quadrant)
    wanted = [p["id"] for p in picks]
    score_rows = rows_by_id(sorted(scores.glob("part-*.parquet")), wanted)
    pruned_rows = rows_by_id(sorted((pruned / "data").glob("*.parquet")), wanted, ["id", "loss_mask"])
    lam = stats["config"]["lam"]
    bodies = [(p, token_view(tokenizer, score_rows[p["id"]], pruned_rows.get(p["id"]), lam)) for p in picks]
    images = {name: (out / name).read_bytes() for name in ("eu_plane.png", "histograms.png")}
    (out / "report.html").write_text(build_html(stats, images, bodies, refresh))
    return out / "report.html"
