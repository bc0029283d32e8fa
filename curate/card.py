"""The dataset card of a pruned folder (`README.md`): the YAML header that `datasets.load_dataset(folder)` and the
Hub read (the training data is data/train-*.parquet, nothing else in the folder), and the provenance a reader
needs to trust it: source, reference model and its hash, the settings, what was kept, the q-curate version."""

from __future__ import annotations

from pathlib import Path

import yaml

from . import __version__, schema, storage

CARD = "README.md"


def source_licence(source: str | Path) -> str | None:
    """The licence the input's own card names (`license:` in the front matter of its README.md): the card of a
    dataset folder, or beside a data file, or one level up (a Hub repo's `data/train-*.parquet`)."""
    if storage.is_url(source) and any(c in str(source) for c in "*?[,"):
        source = str(source).split(",")[0].split("*")[0].rstrip("/")  # a pattern or list: its first folder
    folder = str(source) if storage.exists(source) and storage.is_dir(source) else storage.parent(source)
    for place in (folder, storage.parent(folder)):
        text = storage.read_text(storage.join(place, CARD))
        if text and text.startswith("---"):
            try:
                header = yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError:
                return None
            licence = header.get("license") if isinstance(header, dict) else None
            return licence if isinstance(licence, str) else None
    return None


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


def pruned_card(stats: dict, scores_manifest: dict, changed: dict, licence: str | None) -> str:
    """The card's text; it depends on the data and the settings only (not on where the folder is), so two runs
    of the same prune write the same bytes."""
    header = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": f"{schema.PRUNED_DATA}/{schema.PRUNED_GLOB}"}],
            }
        ],
        **({"license": licence} if licence else {}),
        "tags": ["q-curate", "sft", "data-pruning"],
    }
    model = scores_manifest["model"]
    source = (scores_manifest.get("inputs") or [{}])[0]
    rows = "\n".join(
        f"| {q} | {schema.QUADRANT_NAMES[q]} | {stats['quadrants'][q]:,} | {stats['kept_by_quadrant'][q]:,} |"
        for q in schema.QUADRANTS
    )
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---
# Pruned SFT dataset

Supervised fine-tuning data pruned with q-curate (Q-Tuning, arXiv 2509.23873): {stats["K"]:,}
of {stats["N"]:,} samples kept; {stats["token_pruning"]["rule"] if stats.get("token_pruning") else ""}.

| quadrant | meaning | samples | kept |
|---|---|---:|---:|
{rows}

## Provenance

- source: `{Path(source.get("path", "?")).name}` (content fingerprint `{source.get("fingerprint", "?")}`)
- reference model: `{model["name"]}` (content hash `{model["hash"]}`)
- settings: `{command_line("SCORES", changed)}` (every other option at its default)
- q-curate {__version__}

## Use

```python
import datasets
ds = datasets.load_dataset("PATH/TO/THIS/FOLDER", split="train")
```

Columns: `input_ids`, `attention_mask`, `labels` (-100 where a token is not in the loss: prompts, and the pruned
tokens of Q2 samples), `loss_mask` and `assistant_masks` (the same as 0/1), `messages`, `quadrant`, `selection`,
`ppl`, `ent`. Train the reference model's tokenizer family, or carry the data over with `curate retokenize`.
`samples.parquet` (every sample's place on the plane and fate) and `stats.json` sit beside the data.
"""
