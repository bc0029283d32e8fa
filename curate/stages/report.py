"""`curate report RUN`: the EU plane as pictures and a self-contained HTML page.

RUN is a run folder, a `curate prune` folder or a `curate refresh` folder (`curate.runs.locate`). Writes
eu_plane.png, histograms.png and report.html (images embedded, no network) into RUN/report by default. A
refresh folder gets its last round's pictures and the quadrant transition tables between rounds.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import polars as pl

from .. import io, pruning, runs, storage, strategies
from ..config.report import ReportConfig
from ..executor import Job, runner
from ..explore import INLINE_LIMIT, Explorer, self_contained_page
from ..registry import register
from ..schema import QUADRANT_NAMES, QUADRANTS, SAMPLES, SELECTION_COLOURS, STATS
from ..stage import Cli, Input, Manifest, Stage
from ..tables import pyplot
from ..units import WATCHED_NAMES

# Quadrant names sit outside the plot area (above it for the high-entropy quadrants, below the axis for the low
# ones), where they cover no sample: inside the corners they hid the most extreme points.
CORNERS = {
    "Q1": (1.0, 1.01, "right", "bottom"),
    "Q2": (1.0, -0.12, "right", "top"),
    "Q3": (0.0, -0.12, "left", "top"),
    "Q4": (0.0, 1.01, "left", "bottom"),
}


def plain(text) -> str:
    """A label from the data as matplotlib must draw it: `$` would start mathtext (and `$\\frac{1}{$` crashes)."""
    return str(text).replace("$", r"\$")


def draw_turns(ax, picks: list[dict]) -> None:
    """Each multi-turn example's assistant turns (x), linked to the point where its conversation sits."""
    shown = [p for p in picks if len(p.get("turn_ppl") or []) > 1]
    for i, p in enumerate(shown):
        tx, ty = np.log(p["turn_ppl"]), np.asarray(p["turn_ent"])
        for x, y in zip(tx, ty):
            ax.plot([np.log(p["ppl"]), x], [p["ent"], y], color="#444444", lw=0.7, alpha=0.8)
        label = "assistant turns of a multi-turn example" if i == 0 else None
        ax.scatter(tx, ty, marker="x", s=30, color="#222222", linewidths=1.2, label=label, zorder=3)
        ax.annotate(
            str(p["id"])[:16], (np.log(p["ppl"]), p["ent"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )


def plot_eu_plane(samples: pl.DataFrame, stats: dict, path: Path, picks: list[dict] = ()) -> None:
    plt = pyplot()
    x = np.log(samples["ppl"].to_numpy())
    y = samples["ent"].to_numpy()
    sel = samples["selection"].to_list()
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    kept = np.array([s is not None for s in sel])
    if "group" in samples.columns:  # a mixture: one colour per group; kept samples large, with a black edge
        groups = samples["group"].to_numpy()
        palette = plt.get_cmap("tab20").colors  # every group drawn: colours repeat past 20, labels do not
        for i, g in enumerate(pruning.unique_in_order(groups)):
            colour = palette[i % len(palette)]
            m = groups == g
            ax.scatter(x[m & ~kept], y[m & ~kept], s=8, color=colour, alpha=0.35)
            ax.scatter(
                x[m & kept],
                y[m & kept],
                s=26,
                color=colour,
                edgecolors="black",
                linewidths=0.5,
                label=f"{plain(g)}: kept {(m & kept).sum():,} of {m.sum():,}",
            )
    else:
        if len(x) > 3000:
            ax.hexbin(x, y, gridsize=60, cmap="Greys", bins="log", mincnt=1)
        else:
            ax.scatter(x[~kept], y[~kept], s=10, c="#999999", alpha=0.6, label=f"dropped ({(~kept).sum():,})")
        for name, color in SELECTION_COLOURS.items():
            m = np.array([s == name for s in sel])
            if m.any():
                ax.scatter(
                    x[m], y[m], s=22, c=color, edgecolors="black", linewidths=0.3, label=f"kept {name} ({m.sum():,})"
                )
        others = [s for s in dict.fromkeys(sel) if s is not None and s not in SELECTION_COLOURS]
        for name in others:  # kept by another strategy: its name and what it keeps, from the registry
            m = np.array([s == name for s in sel])
            doc = strategies.REGISTRY[name].doc.split(";")[0] if name in strategies.REGISTRY else ""
            label = f"kept by {plain(name)} ({m.sum():,})" + (f": {plain(doc)}" if doc else "")
            ax.scatter(x[m], y[m], s=22, c="#2ca02c", edgecolors="black", linewidths=0.3, label=label[:90])
    draw_turns(ax, picks)
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
    for q, (cx, cy, ha, va) in CORNERS.items():
        ax.text(
            cx,
            cy,
            f"{q} {QUADRANT_NAMES[q]}: {stats['quadrants'][q]:,} samples",
            transform=ax.transAxes,
            ha=ha,
            va=va,
            fontsize=9,
            clip_on=False,
        )
    ax.set_xlabel("log perplexity of the response (error)")
    ax.set_ylabel("mean predictive entropy, nats (uncertainty)")
    ax.set_title(f"EU plane: kept {stats['K']:,} of {stats['N']:,} samples ({stats['sample_ratio']:.1%})", pad=18)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(samples: pl.DataFrame, path: Path) -> None:
    plt = pyplot()
    kept = samples.filter(pl.col("kept"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    for ax, (col, label, transform) in zip(
        axes,
        (
            ("ppl", "log perplexity", np.log),
            ("ent", "mean entropy (nats)", None),
            ("n_trainable", "trainable tokens per sample", None),
        ),
    ):
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


def token_view(tokenizer, score_row: dict, pruned_row: dict | None, lam: float, scale: str = "ppl") -> str:
    """One sample as HTML spans: prompt, kept loss tokens, pruned tokens, or the response of a dropped sample,
    with scores on hover (data-tip). `pruned_row` is None for a dropped sample."""
    parts = []
    mask = pruned_row["loss_mask"] if pruned_row else None
    for i, tok in enumerate(runs.token_rows(tokenizer, score_row, mask, lam, scale)):
        tip = f"token {i} (id {tok['id']}, {tok['k']}) | logprob {tok['lp']:.3f} | entropy {tok['ent']:.3f}"
        if tok["s"] is not None:
            tip += f" | score {tok['s']:.3g}"
        parts.append(f'<span class="{tok["k"]}" data-tip="{html.escape(tip)}">{html.escape(tok["t"])}</span>')
    return "".join(parts)


def fate(sample: dict, pruned_row: dict | None) -> str:
    """What happened to a sample, in words: dropped, kept whole, or how many of its tokens left the loss."""
    if pruned_row is None:
        return f"dropped as a duplicate of {sample['duplicate_of']}" if sample.get("duplicate_of") else "dropped"
    n, kept = sample["n_trainable"], int(np.sum(pruned_row["loss_mask"]))
    return f"pruned {n - kept:,} of {n:,} tokens" if kept < n else f"kept all {n:,} tokens"


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def thresholds_html(stats: dict) -> str:
    """The triage's thresholds in words, to 3 decimals: where Q2 and Q4 begin at the alpha the bisection found."""
    th = stats.get("thresholds")
    if th:
        return (
            f"<p>Thresholds at alpha {th['alpha']:.3f}: Q2 = perplexity above {th['ppl_high']:.3f} and mean entropy "
            f"at most {th['ent_low']:.3f}; Q4 = perplexity at most {th['ppl_low']:.3f} and mean entropy above "
            f"{th['ent_high']:.3f}. The rest of the budget was filled by percentile ranks.</p>"
        )
    batch = stats.get("alpha_per_batch")
    if batch:
        return (
            f"<p>Thresholds per batch or group: alpha from {batch['min']:.3f} to {batch['max']:.3f} "
            f"(mean {batch['mean']:.3f}).</p>"
        )
    return ""


def token_pruning_html(stats: dict) -> str:
    """The token rule in plain words and what it took out, by kind (stats.json `token_pruning`)."""
    tp = stats.get("token_pruning")
    if not tp or not tp["samples"]:
        return ""
    masked = tp["tokens_trainable"] - tp["tokens_kept"]
    parts = [
        f"<p>Rule: <b>{html.escape(tp['rule'])}</b>. The score of a token is the reference model's surprise at it "
        "(its perplexity, with its neighbours'). Never removed: end-of-turn tokens"
        + "".join(f", {html.escape(p)}" for p in tp["protect"])
        + f".</p><p>{plural(tp['samples'], 'sample')} pruned: {masked:,} of {tp['tokens_trainable']:,} of their "
        f"tokens left the loss; {plural(tp['tokens_over_budget'], 'token was', 'tokens were')} kept above the "
        "budget to keep words whole.</p>"
    ]
    if "masked_by_kind" in tp:
        kinds = tp["masked_by_kind"]
        parts.append(
            f"<p>Masked tokens: {kinds['digits']:,} with digits, {kinds['words']:,} words, "
            f"{kinds['punctuation']:,} punctuation or markup.</p><ul>"
            + "".join(
                f"<li>{tp[n]['samples_lost_part']:,} of {tp[n]['samples_with']:,} pruned samples with a "
                f"{WATCHED_NAMES[n]} lost part of it</li>"
                for n in ("final-answer", "tool-calls")
            )
            + (
                f"<li>{tp['replies_without_content']:,} of {tp['replies']:,} replies of pruned samples train no word "
                f"or number ({tp['protected_share']:.0%} of their tokens are protected or end a turn)</li>"
                if "replies" in tp
                else ""
            )
            + "</ul>"
        )
    if stats.get("duplicates_left_out"):
        parts.append(
            f"<p>{stats['duplicates_left_out']:,} later copies of identical conversations were left out of the "
            "triage (--keep-duplicates keeps them).</p>"
        )
    return '<h2 id="tokens">Token pruning</h2>' + "".join(parts)


def examples(samples: pl.DataFrame, per_quadrant: int) -> list[dict]:
    """A few samples per quadrant; kept ones first (Q2 examples then carry pruned tokens); and, when the data has
    multi-turn conversations and none was picked, two of them (kept first), to show their turns on the plane."""
    chosen = []
    for q in QUADRANTS:
        part = samples.filter(pl.col("quadrant") == q).sort(["kept", "id"], descending=[True, False])
        chosen += part.head(per_quadrant).to_dicts()
    if per_quadrant and "turn_ppl" in samples.columns and not any(len(c["turn_ppl"] or []) > 1 for c in chosen):
        multi = samples.filter(pl.col("turn_ppl").list.len() > 1).sort(["kept", "id"], descending=[True, False])
        chosen += multi.head(2).to_dicts()
    return chosen


def turns_line(sample: dict) -> str:
    turns = sample.get("turn_ppl") or []
    if len(turns) < 2:
        return ""
    points = ", ".join(f"({p:.2f}, {e:.3f})" for p, e in zip(turns, sample["turn_ent"]))
    return f'<p class="turns">assistant turns (ppl, ent): {points}</p>'


def refresh_html(summary: dict) -> str:
    """The rounds of a refresh run and, between consecutive rounds, how samples moved between quadrants."""
    head = "".join(f"<th>{q} (kept)</th>" for q in QUADRANTS)
    rounds = "".join(
        f"<tr><td>{r['round']}</td><td>{html.escape(r['model'])}</td>"
        + "".join(f"<td>{r['quadrants'][q]:,} ({r['kept_by_quadrant'][q]:,})</td>" for q in QUADRANTS)
        + f"<td>{r['K']:,} / {r['N']:,}</td><td>{r['loss_token_ratio']:.1%}</td></tr>"
        for r in summary["rounds"]
    )
    parts = [f"<table><tr><th>round</th><th>scored by</th>{head}<th>kept</th><th>loss tokens</th></tr>{rounds}</table>"]
    for t in summary["transitions"]:
        cols = "".join(f"<th>{q} in round {t['to']}</th>" for q in QUADRANTS)
        body = "".join(
            f"<tr><th>{q} in round {t['from']}</th>"
            + "".join(f"<td>{t['counts'][q][p]:,}</td>" for p in QUADRANTS)
            + "</tr>"
            for q in QUADRANTS
        )
        parts.append(
            f'<h3>Round {t["from"]} &rarr; {t["to"]}</h3><table class="transitions"><tr><th></th>{cols}</tr>'
            f"{body}</table><p>{t['stayed']:,} of {t['samples']:,} samples stayed in their quadrant; "
            f"{t['kept_both']:,} were kept in both rounds.</p>"
        )
    return '<h2 id="refresh">Refresh rounds</h2>' + "".join(parts)


def duplicates_html(duplicates: dict) -> str:
    if not duplicates["groups"]:
        return ""
    fate = (
        "dropped when scored (--dedup)"
        if duplicates["dropped"]
        else "scored (`score --dedup` drops them); prune leaves them out of the triage"
    )
    ids = ", ".join(html.escape(i) for i in duplicates["first_ids"])
    return (
        f'<h2 id="duplicates">Duplicates</h2><p>{duplicates["later_copies"]:,} later copies of '
        f"{duplicates['groups']:,} identical conversations, {fate}. First copies: {ids}.</p>"
    )


# Hovering a token shows its scores in one tooltip element (a `title` would not show in screenshots or tests).
TOOLTIP_JS = """<div id="tip" role="tooltip"></div><script>
const tip = document.getElementById('tip');
document.addEventListener('mouseover', e => {
  const t = e.target.closest('[data-tip]');
  if (!t) { tip.style.display = 'none'; return; }
  tip.textContent = t.dataset.tip;
  const r = t.getBoundingClientRect();
  tip.style.left = (window.scrollX + r.left) + 'px';
  tip.style.top = (window.scrollY + r.bottom + 4) + 'px';
  tip.style.display = 'block';
});
</script>"""


def build_html(
    stats: dict,
    images: dict[str, bytes],
    sample_html: list[tuple[dict, str]],
    duplicates: dict,
    refresh: dict | None = None,
) -> str:
    rows = "".join(
        f"<tr><td>{q}</td><td>{QUADRANT_NAMES[q]}</td><td>{stats['quadrants'][q]:,}</td>"
        f"<td>{stats['kept_by_quadrant'][q]:,}</td></tr>"
        for q in QUADRANTS
    )
    tok = stats["trainable_tokens"]
    summary = (
        f"<p>Kept <b>{stats['K']:,}</b> of {stats['N']:,} samples ({stats['sample_ratio']:.1%}); "
        f"selection {html.escape(', '.join(f'{k} {v:,}' for k, v in stats['selection'].items()))}. Loss tokens "
        f"{tok['after']:,} of "
        f"{tok['all_samples']:,} trainable ({stats['loss_token_ratio']:.1%}).</p>"
    )
    groups = ""
    if stats.get("groups"):
        groups = (
            "<table><tr><th>group</th><th>samples</th><th>kept</th><th>ratio</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(g)}</td><td>{v['N']:,}</td><td>{v['K']:,}</td><td>{v['ratio']}</td></tr>"
                for g, v in stats["groups"].items()
            )
            + "</table>"
        )
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, data in images.items()
    )
    cards = "".join(
        f'<div class="sample" data-quadrant="{s["quadrant"]}"><h3>{html.escape(str(s["id"]))} &middot; '
        f"{s['quadrant']} &middot; {s['selection'] or 'dropped'} &middot; ppl {s['ppl']:.2f}, ent {s['ent']:.3f} "
        f"&middot; {html.escape(s['fate'])}</h3>"
        f"{turns_line(s)}<pre>{body}</pre></div>"
        for s, body in sample_html
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>q-curate report</title><style>
body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}} img{{max-width:100%}} pre{{white-space:pre-wrap;font-size:13px}}
.prompt{{color:#666;background:#eeeeee}} .kept{{background:#c7f0c2}}
.pruned{{background:#f7b6b6;text-decoration:line-through}} .dropped{{color:#555;background:#dfe6f5}}
.sample{{border:1px solid #ddd;border-radius:6px;padding:0 1em;margin:1em 0}}
#tip{{display:none;position:absolute;z-index:10;background:#222;color:#fff;padding:4px 8px;border-radius:4px;
font-size:12px}}
</style></head><body>
<h1>q-curate report</h1>{refresh_html(refresh) if refresh else ""}
<h2 id="summary">Summary{" of the last round" if refresh else ""}</h2>{summary}
<table><tr><th>quadrant</th><th>meaning</th><th>samples</th><th>kept</th></tr>{rows}</table>{groups}
{thresholds_html(stats)}
{duplicates_html(duplicates)}{token_pruning_html(stats)}
<h2 id="pictures">Pictures</h2>{imgs}
<h2 id="examples">Examples</h2>
<p>Legend: <span class="prompt">prompt (context)</span> <span class="kept">kept loss token</span>
<span class="pruned">pruned token</span> <span class="dropped">response of a dropped sample</span>. Hover a token
for its log-prob, entropy and pruning score.</p>
{cards}{TOOLTIP_JS}</body></html>"""


def explore_html(n: int) -> str:
    """Where to see every sample: the self-contained explorer beside the report, or `curate explore`."""
    if n <= INLINE_LIMIT:
        return (
            '<h2 id="explore">Every sample</h2><p><a href="explore.html">explore.html</a>: all '
            f"{n:,} samples on the plane: hover, zoom, filter, search, select, and click one for its tokens.</p>"
        )
    return (
        f'<h2 id="explore">Every sample</h2><p>This run has {n:,} samples, more than a self-contained page holds '
        f"({INLINE_LIMIT:,}): <code>curate explore RUN</code> shows them all in your browser.</p>"
    )


def identify(job: Job) -> dict:
    """The run the report draws, found from whatever folder the user named (and verified)."""
    job.context["run"] = found = runs.locate(job.inputs["run"])
    return {"pruned": found.pruned_manifest["fingerprint"], "refresh": found.refresh}


def compute(job: Job) -> dict:
    cfg, out, found = job.cfg, job.out, job.context["run"]
    samples = pl.read_parquet(found.pruned / SAMPLES, glob=False)
    stats = io.read_json(found.pruned / STATS)
    picks = examples(samples, cfg.examples)
    try:
        plot_eu_plane(samples, stats, out / "eu_plane.png", picks if cfg.turns else ())
        plot_histograms(samples, out / "histograms.png")
    except OSError as e:  # matplotlib's writers lose the file name (a full disk said "error: : No space left")
        raise OSError(e.errno, e.strerror, str(e.filename or out)) from None
    tokenizer = runs.scoring_tokenizer(found)
    wanted = [p["id"] for p in picks]
    score_rows = runs.rows_by_id(found.score_files(), wanted)
    pruned_rows = runs.rows_by_id(found.pruned_files(), wanted, ["id", "loss_mask"])
    bodies = [
        (
            {**p, "fate": fate(p, pruned_rows.get(p["id"]))},
            token_view(
                tokenizer,
                score_rows[p["id"]],
                pruned_rows.get(p["id"]),
                stats["config"]["lam"],
                stats["config"].get("token_score", "ppl"),
            ),
        )
        for p in picks
    ]
    images = {name: (out / name).read_bytes() for name in ("eu_plane.png", "histograms.png")}
    page = build_html(stats, images, bodies, found.scores_manifest.duplicates, found.refresh)
    page = page.replace('<h2 id="pictures">', explore_html(samples.height) + '<h2 id="pictures">', 1)
    if samples.height <= INLINE_LIMIT:  # the interactive plane, self-contained, beside the report
        io.write_bytes_atomic(out / "explore.html", self_contained_page(Explorer(found)).encode())
    io.write_bytes_atomic(out / "report.html", page.encode())
    return {"report": str(out / "report.html"), "pruned": io.record_path(out, found.pruned)}


class ReportResult(Manifest):
    report: str


STAGE = register(
    Stage(
        name="report",
        produces="report",
        config=ReportConfig,
        doc="Draw the EU plane (eu_plane.png, histograms.png) and write a self-contained report.html.",
        compute=compute,
        identify=identify,
        inputs=(Input("run"),),
        outputs=("eu_plane.png", "histograms.png", "report.html", "explore.html"),
        needs=lambda cfg: ("matplotlib", "plotly", "transformers"),
        out=lambda cfg: cfg.out or storage.join(cfg.run, "report"),
        result=ReportResult,
        summary=lambda m: [f"report: {m.report}"],
        cli=Cli(arguments=("run",), first=(), follows=("pruned",)),
    )
)
run = runner(STAGE)
