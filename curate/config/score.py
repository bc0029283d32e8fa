"""`curate score`'s options: the reference model, the scorer, where it runs and what it reads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import RUNTIME, Device, Engine, FieldNames, Options, PosInt, RayAddress, formerly

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
Dtype = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


class ScoreOptions(Options):
    model: str | None = Field(
        None, description="Reference model: a local folder or hub id. Default: the built-in SmolLM2-135M-Instruct."
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="Scorer: hf (transformers), vllm, or auto (vllm with a CUDA GPU and vllm installed, else hf).",
    )
    engine: Engine = "local"
    address: RayAddress = None
    workers: PosInt | None = Field(
        None,
        description="Ray: scorer actors, one scorer each (default: one per GPU of the cluster, or 1 without GPUs); "
        "locally one scorer.",
        json_schema_extra={**RUNTIME, **formerly("num_workers")},
    )
    gpus_per_worker: float | None = Field(
        None,
        ge=0,
        description="Ray: GPUs per actor; with vLLM, more than 1 is tensor parallelism (default 1 with GPUs, else 0).",
        json_schema_extra=RUNTIME,
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray: CPU cores per actor.", json_schema_extra=RUNTIME)
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt-completion", "pairs"] = Field(
        "auto", description="Input format; auto decides by majority over the first rows."
    )
    fields: FieldNames = None
    keep_fields: list[str] = Field(
        default_factory=list,
        description="Input fields to carry into the scores (e.g. source), comma-separated on the CLI.",
    )
    signals: list[Literal["ifd"]] = Field(
        default_factory=list,
        description="Extra scores, comma-separated: ifd (each assistant turn's text also scored alone, with the "
        "tokenizer's defaults and no template, for IFD = ppl / ppl_alone and `prune --strategy ifd`; costs about "
        "the answers' share of the tokens again).",
    )
    dedup: bool = Field(
        False,
        description="Drop later copies of an identical conversation (reason duplicate_content); always counted.",
    )
    limit: PosInt | None = Field(None, description="Read only the first N rows of the input.")
    split: str | None = Field(
        None, description="A Hub-layout dataset folder's split to read (default train, or its card's first)."
    )
    subset: str | None = Field(
        None, description="A Hub-layout dataset folder's subset (its card's config_name; default: `default`)."
    )
    positions: Literal["all", "trainable"] = Field(
        "all",
        description="Which tokens get scores: all (the prompt too: for prune --entropy-positions all and the "
        "report) or trainable (faster: the LM head and the reduction skip the prompt; NaN there).",
    )
    max_length: int = Field(
        2048, ge=2, description="Truncate longer sequences to this many tokens (flagged `truncated`)."
    )
    batch_tokens: int | None = Field(
        None,
        ge=2,
        description="Padded tokens per forward batch (rows are length-sorted); default 2,048 on CPU, 4,096 on a GPU "
        "(raise it there: pipelines/gpu.yaml uses 65,536).",
    )
    shard_size: PosInt = Field(512, description="Input rows per output shard: the unit of resume and of parallel work.")
    tokenize_workers: int | None = Field(
        None,
        ge=0,
        description="Processes tokenising the next shards while one is scored (local engine; default: "
        "none on CPU, where they would share the scorer's cores; up to 4 with a GPU).",
        json_schema_extra=RUNTIME,
    )
    dtype: Dtype = Field(
        "auto",
        description="Model dtype: auto is bfloat16 on CUDA and on CPUs that compute bf16 natively (AMX or "
        "AVX512-BF16), else float32; resolved once per run and recorded. float32 reproduces scores across machines.",
    )
    device: Device = "auto"
    max_row_bytes: PosInt = Field(
        4_000_000,
        description="Skip (and count) an input row above this many bytes before parsing it: one huge row must not "
        "cost minutes and gigabytes for the --max-length tokens it keeps (4 MB is about a million tokens).",
    )
    on_bad_row: Literal["skip", "fail"] = Field(
        "skip",
        description="skip: count unusable rows with their reason; fail: stop at the first, naming file, row and field.",
    )
    tensor_parallel_size: PosInt = Field(1, description="vLLM: GPUs per model (tensor parallelism).")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM: share of GPU memory for weights and KV cache (0.9); on CPU a 1 GiB KV cache.",
    )
    max_num_batched_tokens: PosInt | None = Field(
        None, description="vLLM: tokens per engine step; longer rows are prefilled in chunks (vLLM's default)."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="vLLM: longest sequence the engine accepts (--max-length)."
    )
    enforce_eager: bool | None = Field(
        None, description="vLLM: skip torch.compile and CUDA graphs (default: eager on CPU, compiled on GPU)."
    )
    vllm_entropy: Literal["exact", "topk"] = Field(
        "exact",
        description="vLLM: exact (full-vocabulary entropy via the q-curate plugin) or topk (approximate, flagged).",
    )

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, v: str) -> str:
        return DTYPE_ALIASES.get(v, v)

    @field_validator("keep_fields", "signals", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [f.strip() for f in v.split(",") if f.strip()]
        return v

    @field_validator("keep_fields")
    @classmethod
    def _not_built_in(cls, v: list[str]) -> list[str]:
        from ..schema import SCORES

        for name in v:
            if name in SCORES.names:
                raise ValueError(f"{name!r} is a column q-curate writes itself; keep another field")
        return v


# The score options the commands with sections (`refresh`, `probe`) expose; the rest is set in their YAML form.
SCORE_OPTIONS = ("model", "format", "fields", "limit", "max_length", "backend", "device", "dtype")


class ScoreSection(ScoreOptions):
    input: str = Field(
        description="SFT data: a .jsonl, .json or .parquet file, a glob or comma-separated list of them, a folder laid "
        "out as a Hub dataset (hf://datasets/ORG/NAME), a datasets save_to_disk folder (`demo`: the built-in data); "
        "local or at an fsspec URL (s3://, gs://, hf://)."
    )


class ScoreConfig(ScoreSection):
    out: str = Field(description="Folder for the scores (part-NNNNN.parquet + _manifest.json); a path or a URL.")
