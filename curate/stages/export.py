"""`curate export PRUNED --format F --out DIR`: the pruned data in the shape each trainer accepts.

LLaMA-Factory reads a `save_to_disk` DatasetDict via `tokenized_path` and fails on extra columns; axolotl takes
pre-tokenized rows with exactly input_ids/attention_mask/labels and no `type:`; TRL uses a `labels` column as
is. Each export also writes the ready-to-paste config (or script) for its framework next to the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io, schema
from ..config.export import ExportConfig
from ..errors import CurateError
from ..executor import Job, runner
from ..registry import register
from ..stage import Cli, Input, Manifest, Stage

TOKENIZED = ["input_ids", "attention_mask", "labels"]
JSONL_COLUMNS = ["id", "messages", "tools", "input_ids", "labels", "loss_mask", "quadrant", "selection"]
UNKNOWN_MODEL = "PATH/TO/THE/SCORING/MODEL"  # the model whose tokenizer made the data: train it (or a sibling)


def _read(files: list[Path], columns: list[str]) -> pa.Table:
    try:
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    except (KeyError, pa.ArrowInvalid) as e:
        raise CurateError(f"{files[0].parent}: not a `curate prune` output ({e})") from None


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "w") as f:
        for batch in table.to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def py(value) -> str:
    """A path or name as a Python string literal: quotes, `#` and newlines in it cannot change the code."""
    return repr(str(value))


def yml(value) -> str:
    """A path or name as a YAML (and comment-safe) scalar: a JSON string, which YAML reads as the same string."""
    return json.dumps(str(value), ensure_ascii=False)


def _llamafactory(table: pa.Table, out: Path, model: str, max_len: int) -> tuple[str, str]:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset(table)}).save_to_disk(str(out / "tokenized"))
    return (
        "llamafactory_sft.yaml",
        f"""\
# llamafactory-cli train {yml(out / "llamafactory_sft.yaml")}
# The data is already tokenised and masked by q-curate: LLaMA-Factory loads it from tokenized_path and skips
# its own preprocessing. Its argument parser still wants a `dataset` name for training; with tokenized_path
# holding the data the name is never looked up.
model_name_or_path: {yml(model)}
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: q_curate_pruned
tokenized_path: {yml(out / "tokenized")}
template: empty
cutoff_len: {max_len}
per_device_train_batch_size: 8
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
output_dir: saves/q-curate-lora
""",
    )


def _axolotl(table: pa.Table, out: Path, model: str, max_len: int) -> tuple[str, str]:
    _write_jsonl(table, out / "data.jsonl")
    return (
        "axolotl.yaml",
        f"""\
# axolotl train {yml(out / "axolotl.yaml")}
# Pre-tokenised rows (input_ids, attention_mask, labels with -100 on masked tokens): no `type:` on purpose.
base_model: {yml(model)}
datasets:
  - path: {yml(out / "data.jsonl")}
    ds_type: json
    type:
sequence_len: {max_len}
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
micro_batch_size: 8
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
num_epochs: 3
lr_scheduler: cosine
output_dir: ./outputs/q-curate-lora
""",
    )


def _trl(table: pa.Table, out: Path, model: str, max_len: int) -> tuple[str, str]:
    io.write_parquet_atomic(table, out / schema.pruned_shard(0, 1))
    return (
        "train_trl.py",
        f"""\
# python {yml(out / "train_trl.py")}
# TRL uses the `labels` column as is (-100 = not in the loss), with or without packing.
import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

dataset = load_dataset("parquet", data_files={py(out / "data" / "*.parquet")}, split="train")
gpu = torch.cuda.is_available()
# A GPU takes the paper's batch (8 rows x 4 accumulated) in bf16; a CPU one row a step in float32 (bf16 needs a GPU
# or runs emulated), so that a step takes seconds, not minutes. A loss line from the first step on.
args = SFTConfig(output_dir="q-curate-sft", max_length={max_len}, packing=True, learning_rate=1e-4,
                 num_train_epochs=3, per_device_train_batch_size=8 if gpu else 1,
                 gradient_accumulation_steps=4 if gpu else 1, lr_scheduler_type="cosine",
                 bf16=gpu and torch.cuda.is_bf16_supported(), use_cpu=not gpu,
                 logging_steps=1, logging_first_step=True)
SFTTrainer(model={py(model)}, args=args, train_dataset=dataset).train()
""",
    )


def _jsonl(table: pa.Table, out: Path, model: str, max_len: int) -> tuple[str, str]:
    _write_jsonl(table, out / "data.jsonl")
    return (
        "load.py",
        f"""\
# python {yml(out / "load.py")}
# One JSON object per sample: id, messages, tools (JSON text or null), input_ids, labels (-100 = not in the
# loss), loss_mask, quadrant, selection. Tokens come from {yml(model)}.
from datasets import load_dataset

dataset = load_dataset("json", data_files={py(out / "data.jsonl")}, split="train")
print(dataset)
""",
    )


WRITERS = {
    "llamafactory": (_llamafactory, TOKENIZED),
    "axolotl": (_axolotl, TOKENIZED),
    "trl": (_trl, ["input_ids", "labels"]),
    "jsonl": (_jsonl, JSONL_COLUMNS),
}
OUTPUTS = (
    "tokenized/",
    f"{schema.PRUNED_DATA}/{schema.PRUNED_GLOB}",
    "data.jsonl",
    "llamafactory_sft.yaml",
    "axolotl.yaml",
    "train_trl.py",
    "load.py",
)


def identify(job: Job) -> dict:
    return {"out": str(job.out.resolve())}  # the config snippet names OUT: an export elsewhere is another run


def compute(job: Job) -> dict:
    cfg, out, source = job.cfg, job.out, job.manifests["pruned"]
    writer, columns = WRITERS[cfg.format]
    table = _read(io.pruned_data_files(job.inputs["pruned"], source), columns)
    max_len = pc.max(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    name, snippet = writer(table, out.resolve(), source.model.get("path", UNKNOWN_MODEL), max_len)
    io.write_bytes_atomic(out / name, snippet.encode())
    config_file = str((out / name).resolve())
    return {"format": cfg.format, "rows": table.num_rows, "columns": columns, "config_file": config_file}


class ExportResult(Manifest):
    format: str
    rows: int
    columns: list[str]
    config_file: str


def summary(m: ExportResult) -> list:
    # the snippet as written, unwrapped, so that it can be pasted from a log
    return [Path(m.config_file).read_text(), f"exported to {m.config['out']}; config written to {m.config_file}"]


STAGE = register(
    Stage(
        name="export",
        produces="export",
        config=ExportConfig,
        doc="Write the pruned data in the shape a training framework accepts, with a ready-to-paste config.",
        compute=compute,
        identify=identify,
        inputs=(Input("pruned", kind="pruned", hint="export the output of `curate prune`"),),
        outputs=OUTPUTS,
        needs=lambda cfg: ("datasets",) if cfg.format == "llamafactory" else (),
        result=ExportResult,
        summary=summary,
        cli=Cli(arguments=("pruned",), first=()),
    )
)
run = runner(STAGE)
