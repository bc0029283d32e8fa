"""The dataset card of a pruned folder (`README.md`): the YAML header that `datasets.load_dataset(folder)` and the
Hub read (the training data is data/train-*.parquet, nothing else in the folder), and the provenance a reader
needs to trust it: source, reference model and its hash, the settings, what was kept, the q-curate version."""

from __future__ import annotations

import hashlib
import re
import shlex
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from . import __version__, schema, storage
from .errors import CurateError
from .kinds import Scores

CARD = "README.md"
PICTURE = "eu_plane.png"
GREY, COLOURS = (
    (140, 140, 140),
    {"Q2": (214, 39, 40), "fill-Q2": (255, 152, 150), "Q4": (31, 119, 180), "fill-Q4": (174, 199, 232)},
)  # schema.SELECTION_COLOURS, as RGB
OTHER = (44, 160, 44)  # kept by another strategy (longest, ifd, random...): green, as in the report's plot


def plane_picture(ppl: np.ndarray, ent: np.ndarray, selection: list, width: int = 480, height: int = 360) -> bytes:
    """The EU plane as a PNG for the card, drawn without a plotting library (prune needs none): every sample a grey
    dot at (log ppl, entropy), the kept ones over them in their selection's colour (green: kept by another strategy
    than Q-Tuning); the same bytes for the same samples. The axes run from the 0.5th to the 99.5th percentile."""
    img = np.full((height, width, 3), 255, np.uint8)
    x, y = np.log(np.asarray(ppl, float)), np.asarray(ent, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, sel = x[ok], y[ok], [s for s, good in zip(selection, ok) if good]
    pad = 10

    def scale(v: np.ndarray, n: int) -> np.ndarray:
        lo, hi = np.percentile(v, [0.5, 99.5]) if len(v) else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        return np.clip(np.round((v - lo) / (hi - lo) * (n - 1 - 2 * pad) + pad), 0, n - 1).astype(int)

    px, py = scale(x, width), height - 1 - scale(y, height)
    img[height - pad, pad : width - pad + 1] = img[pad : height - pad + 1, pad] = 0  # the axes
    for d in ((0, 0), (0, 1), (1, 0), (1, 1)):  # dropped samples as 2x2 dots, kept ones 3x3 over them
        img[np.clip(py + d[0], 0, height - 1), np.clip(px + d[1], 0, width - 1)] = GREY
    others = [s for s in dict.fromkeys(sel) if s is not None and s not in COLOURS]
    for name, colour in [*COLOURS.items(), *((s, OTHER) for s in others)]:
        m = np.array([s == name for s in sel], bool)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                img[np.clip(py[m] + dy, 0, height - 1), np.clip(px[m] + dx, 0, width - 1)] = colour
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


# The front matter as the Hub finds it: a first line `---`, then everything up to the next line that is `---`.
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|\Z)", re.S | re.M)


class _CardLoader(yaml.SafeLoader):
    """A safe loader that refuses aliases: a card needs none, and `*x` repeated in nested lists expands a few
    hundred bytes into billions of items (a "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "uses an alias (*name), which a card never needs", mark)
        return super().compose_node(parent, index)


def front_matter(text: str | None, where: str) -> dict:
    """The YAML header of a dataset card (its `---` block), parsed safely; {} without one. One-line errors."""
    found = FRONT_MATTER.match(text or "")
    if not found:
        return {}
    try:
        header = yaml.load(found.group(1), Loader=_CardLoader)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise CurateError(f"{where}: the card's YAML header is not valid ({problem})") from None
    return header if isinstance(header, dict) else {}


def source_card(source: str | Path) -> dict:
    """What the input's own card says that the pruned data inherits: `license` and `language` (from the front
    matter of its README.md: the card of a dataset folder, or beside a data file, or one level up, as a Hub repo's
    `data/train-*.parquet` has it); {} without a card."""
    if storage.is_url(source) and any(c in str(source) for c in "*?[,"):
        source = str(source).split(",")[0].split("*")[0].rstrip("/")  # a pattern or list: its first folder
    folder = str(source) if storage.exists(source) and storage.is_dir(source) else storage.parent(source)
    for place in (folder, storage.parent(folder)):
        card = storage.join(place, CARD)
        text = storage.read_text(card)
        if text and FRONT_MATTER.match(text):
            try:
                header = front_matter(text, card)
            except CurateError:
                return {}  # the card is the input's; score reads its configs and says what is wrong there
            return {k: header[k] for k in ("license", "language") if isinstance(header.get(k), (str, list))}
    return {}


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket for n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "10M<n<100M"


def data_identity(entries: list[dict]) -> str:
    """A fingerprint of the training data files (their names and checksums, as the manifest lists them)."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e["name"]):
        h.update(f"{e['name']}\0{e['blake2b']}\0".encode())
    return h.hexdigest()[:16]


def dataset_info(rows: int, data_bytes: int) -> dict:
    """The card's `dataset_info`: the features as the installed `datasets` writes and reads them (its YAML for a
    list changed between versions; none without `datasets`, whose readers then take them from the Parquet), the
    split's size and the bytes of its files, as the Hub writes them."""
    info: dict = {}
    try:
        import datasets

        features = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema.PRUNED))
        info["features"] = features._to_yaml_dict()["features"]
    except ImportError:
        pass
    info["splits"] = [{"name": "train", "num_examples": rows}]
    info["download_size"] = data_bytes
    return {"dataset_info": info}


def command_line(scores: str, options: dict) -> str:
    """`curate prune SCORES --out OUT` with the options that differ from their defaults."""
    parts = ["curate prune", scores]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            parts += [flag, ",".join(map(str, value)) or "none"]
        elif isinstance(value, dict):
            parts += [flag, ",".join(f"{k}:{v}" for k, v in value.items())]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def score_command(source: str, config: dict, scores: Scores) -> str:
    """`curate score SOURCE` with what decided the scores: the model, the dtype it ran in, the row limit and the
    length cut."""
    dtype = scores.dtype.get("dtype") or config.get("dtype", "auto")
    from .models import BUILTIN_LABEL

    model = config.get("model") or "builtin"
    model = "builtin" if model == BUILTIN_LABEL else model  # the label names the built-in model for people
    parts = ["curate score", source, "--model", shlex.quote(str(model)), "--dtype", str(dtype)]
    for key in ("limit", "max_length", "fields", "subset", "split"):
        if config.get(key) is not None and not (key == "max_length" and config[key] == 2048):
            parts += [f"--{key.replace('_', '-')}", shlex.quote(str(config[key]))]
    if config.get("signals"):
        parts += ["--signals", ",".join(config["signals"])]
    return " ".join(parts)


def picture_legend(selection: dict) -> str:
    """What the colours of `plane_picture` mean, for the selections a prune made ({selection: samples kept})."""
    from . import strategies

    others = [s for s in selection if s not in COLOURS]
    if not others:
        return "grey samples were dropped, red ones kept as Q2 (pale: fill), blue ones as Q4"
    docs = {s: strategies.REGISTRY[s].doc.split(";")[0] for s in others if s in strategies.REGISTRY}
    named = ", ".join(f"`{s}`" + (f" ({docs[s]})" if s in docs else "") for s in others)
    return f"grey samples were dropped, green ones kept by {named}"


def pruned_card(stats: dict, scores: Scores, changed: dict, inherited: dict, data_files: list[dict]) -> str:
    """The card's text; it depends on the data and the settings only (not on where the folder is), so two runs
    of the same prune write the same bytes. `data_files`: the manifest entries of the training data files.

    `datasets.load_dataset(folder)` caches a local folder under its name, the card's config and a hash of the
    card's `configs` and `dataset_info`, not of the files: two folders named `pruned` (or one pruned again) with
    the same card would read back the first one's cached rows. The config's description names the data files'
    fingerprint, so the cache key changes exactly when the data does.
    """
    identity = data_identity(data_files)
    header = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": f"{schema.PRUNED_DATA}/{schema.PRUNED_GLOB}"}],
                "description": f"q-curate pruned data, files {identity}",
            }
        ],
        **inherited,  # the source card's licence and language
        "task_categories": ["text-generation"],
        "size_categories": [size_category(stats["K"])],
        "tags": ["q-curate", "sft", "data-pruning"],
        **dataset_info(stats["K"], sum(e["bytes"] for e in data_files)),
    }
    model = scores.model
    source = scores.inputs[0] if scores.inputs else {}
    picked = scores.source
    picked = ", ".join(f"{k} {picked[k]}" for k in ("subset", "split") if picked.get(k)) + (
        f" ({len(picked['files'])} data files)" if len(picked.get("files", [])) > 1 else ""
    )
    picked = f" ({picked.strip()})" if picked.strip() else ""
    rows = "\n".join(
        f"| {q} | {schema.QUADRANT_NAMES[q]} | {stats['quadrants'][q]:,} | {stats['kept_by_quadrant'][q]:,} |"
        for q in schema.QUADRANTS
    )
    source_name = PurePosixPath(str(source.get("path", "?"))).name
    score_config = scores.config
    notes = []
    if not inherited.get("license"):
        notes.append(f"- licence: the source's card names none; check the terms of `{source_name}` before you publish")
    if score_config.get("limit"):
        notes.append(f"- only the first {score_config['limit']:,} rows of the source were read (`--limit`)")
    left_out = stats.get("duplicates_left_out", 0)
    if left_out:
        notes.append(
            f"- {left_out:,} later copies of identical conversations were left out before the triage (they are "
            "counted in the quadrant table above and never kept; `--keep-duplicates` keeps them)"
        )
    if stats.get("excluded"):
        notes.append(f"- {stats['excluded']:,} samples were left out as `--exclude-ids` asked")
    scored_with = score_command(source_name, score_config, scores)
    notes_text = ("\n" + "\n".join(notes)) if notes else ""
    template = f"; chat template `{scores.chat_template_hash}`" if scores.chat_template_hash else ""
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---
# Pruned SFT dataset

Supervised fine-tuning data pruned with q-curate (Q-Tuning, arXiv 2509.23873): {stats["K"]:,}
of {stats["N"]:,} samples kept; {stats["token_pruning"]["rule"] if stats.get("token_pruning") else ""}.

| quadrant | meaning | samples | kept |
|---|---|---:|---:|
{rows}

![The EU plane: log perplexity (x) against mean entropy (y); {picture_legend(stats["selection"])}]({PICTURE})

## Provenance

- source: `{PurePosixPath(str(source.get("path", "?"))).name}`{picked}, identified by its contents
  (fingerprint `{source.get("fingerprint", "?")}`: a changed file is a different source)
- reference model: `{model["name"]}` (content hash `{model["hash"]}`{template})
- scored with: `{scored_with}`
- pruned with: `{command_line("SCORES", changed)}` (every other option at its default)
- q-curate {__version__}{notes_text}

## Use

```python
import datasets
ds = datasets.load_dataset("PATH/TO/THIS/FOLDER", split="train")
```

Columns: `input_ids`, `attention_mask`, `labels` (-100 where a token is not in the loss: prompts, and the pruned
tokens of Q2 samples), `loss_mask` and `assistant_masks` (the same as 0/1), `messages` (system, user, assistant and
tool turns) with `tools` (the tool schemas as JSON text, or null: TRL's conversational format), `quadrant`,
`selection`, `ppl`, `ent`. Train the reference model's tokenizer family, or carry the data over with
`curate retokenize`. `samples.parquet` (every sample's place on the plane and fate) and `stats.json` sit beside
the data.
"""
