"""Every option of every stage, defined once: one typed model per stage.

The CLI builds each command's options from these models (`curate.options`), pipeline YAML is validated
against them, and the stages read them. Choices are `Literal`s, so `--help` lists them and bad values are
rejected before any work; every problem is reported at once, with its option or key path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CurateError

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


def _fraction(v: float) -> float:
    """A share in (0, 1]; a percentage (12.5) is a likely slip, named."""
    if 1 < v <= 100:
        raise ValueError(f"is a fraction in (0, 1]: did you mean {v / 100:g}?")
    if not 0 < v <= 1:
        raise ValueError("must be a fraction in (0, 1]")
    return v


Ratio = Annotated[float, AfterValidator(_fraction)]


# Declared on a field that says how or where a stage runs, not what it computes: it is left out of the run's
# fingerprint (`curate.stage.in_fingerprint`), so a run started one way can be resumed another.
RUNTIME = {"fingerprint": False}


Device = Annotated[
    str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when present), cpu, cuda or cuda:N.")
]
RayAddress = Annotated[
    str | None,
    Field(
        description="Ray: the cluster to join (auto, or ray://HOST:10001); default: start a local Ray.",
        json_schema_extra=RUNTIME,
    ),
]


def _check_fields(v: str | None) -> str | None:
    if v is not None:
        from .formats import parse_fields

        try:
            parse_fields(v)
        except CurateError as e:
            raise ValueError(str(e)) from None
    return v


FieldNames = Annotated[
    str | None,
    AfterValidator(_check_fields),
    Field(
        description="Field names for prompt/response rows when not auto-detected: "
        "prompt=question,response=answer[,system=S][,id=I]."
    ),
]


class Options(BaseModel):
    """Strict: a YAML `limit: true` is an error, not 1; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ---------------------------------------------------------------- score

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
    engine: Literal["local", "ray"] = Field(
        "local",
        description="local: this process; ray: a pool of Ray actors, one scorer each, over many GPUs/machines.",
        json_schema_extra=RUNTIME,
    )
    address: RayAddress = None
    num_workers: PosInt | None = Field(
        None,
        description="Ray: scorer actors (default: one per GPU of the cluster, or 1 without GPUs).",
        json_schema_extra=RUNTIME,
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
        from .schema import SCORES

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


# ---------------------------------------------------------------- prune


def parse_group_ratios(v: Any) -> Any:
    """`source=math:0.2,chat:0.1` (CLI) or {math: 0.2, chat: 0.1} (YAML) -> {"math": 0.2, "chat": 0.1}."""
    if not isinstance(v, str):
        return v
    spec = v.split("=", 1)[1] if "=" in v.split(":", 1)[0] else v
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition(":")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"cannot read {part!r}; expected GROUP:RATIO, e.g. math:0.2,chat:0.1") from None
        if not sep or not name:
            raise ValueError(f"cannot read {part!r}; expected GROUP:RATIO, e.g. math:0.2,chat:0.1")
    return out


def _strategy_docs() -> list[tuple[str, str]]:
    from . import strategies

    return [(s.name, s.doc) for s in strategies.REGISTRY.values()]


class SelectionOptions(Options):
    """Which samples and tokens stay in the loss: the triage and the token rule, shared by `curate prune` (over a
    data set) and the in-trainer loss (`curate.dynamic`, over each micro-batch), with the same names and defaults."""

    ratio: Ratio = Field(0.125, description="Fraction of samples to keep, in (0, 1]: exactly max(1, round(ratio*N)).")
    token_ratio: Ratio = Field(
        0.5, description="Fraction of trainable tokens kept in Q2 (misconception) samples, in (0, 1]."
    )
    preset: Literal["paper"] | None = Field(
        None,
        description="paper: every option of the paper's rule at once (--token-unit token --protect none "
        "--token-order drop-high --token-budget sample --token-score ppl --lam 0.5 --placement conversation "
        "--fill minmax); options given beside it still apply.",
        json_schema_extra=RUNTIME,  # a shorthand: the options it sets are fingerprinted themselves
    )
    lam: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Context weight of the token score (1-lam)*x_i + lam*(x_i-1 + x_i+1): 0 scores a token by itself "
        "(default, chosen by experiment: EXPERIMENTS.md), 0.5 is the paper's context-aware score.",
    )
    token_score: Literal["ppl", "nll"] = Field(
        "ppl",
        description="The x of the token score: ppl (exp(-log-prob), the paper's formula) or nll (-log-prob: one "
        "surprising neighbour cannot outweigh the token itself by orders of magnitude).",
    )
    token_budget: Literal["turn", "sample"] = Field(
        "turn",
        description="turn: every assistant turn keeps its protected spans and end-of-turn marker plus "
        "--token-ratio of its other tokens (at least one word of every reply); sample: --token-ratio of all the "
        "sample's trainable tokens, protected ones counted in it (the paper's budget: tool calls use it up).",
    )
    entropy_positions: Literal["response", "all"] = Field(
        "response", description="Mean entropy over response tokens (paper) or over all positions (official code)."
    )
    placement: Literal["conversation", "worst-turn", "max-turn"] = Field(
        "max-turn",
        description="Where a multi-turn sample sits on the EU plane: conversation (mean over all assistant tokens, "
        "the paper), worst-turn (at its assistant turn with the highest perplexity) or max-turn (each coordinate "
        "the largest over its assistant turns). Single-turn samples sit at the same point under every rule.",
    )
    token_order: Literal["drop-high", "drop-low"] = Field(
        "drop-low",
        description="drop-low: remove the lowest-scoring tokens, the ones the reference model already predicts "
        "(default, chosen by experiment: EXPERIMENTS.md); drop-high: remove the ones it finds MOST surprising (the "
        "paper's rule, which with a small reference model masks the content a model must learn).",
    )
    token_unit: Literal["word", "token"] = Field(
        "word",
        description="word: a word or a number (with its separators) leaves the loss whole or not at all, scored "
        "by the mean of its tokens' scores; token: single tokens, the paper's rule exactly.",
    )
    protect: list[Literal["final-answer", "numbers", "tool-calls", "code"]] = Field(
        default_factory=lambda: ["final-answer", "tool-calls"],
        description="Spans token pruning never removes (kept besides the per-turn budget; the per-sample budget "
        "counts them), comma-separated: "
        "final-answer (a GSM8K `#### N` line, else a last \\boxed{}), numbers, tool-calls (JSON function calls), "
        "code (fenced blocks); `none` for nothing. Default: final-answer,tool-calls.",
    )
    protect_regex: str | None = Field(
        None, description="Also protect what this regular expression matches in an assistant turn's text."
    )
    strategy: str = Field(
        "qtuning",
        description="Sample strategy (curate.strategies; a strategy registered there from Python is allowed too): "
        + "; ".join(f"{name}: {doc}" for name, doc in _strategy_docs())
        + ".",
    )
    token_strategy: Literal["qtuning", "random", "ppl", "none"] = Field(
        "qtuning", description="Token strategy: Q-Tuning, random, ppl (drop highest token PPL), or none."
    )
    fill: Literal["rank", "minmax"] = Field(
        "rank",
        description="How the budget is filled after the quadrants: percentile ranks, or min-max (the official code).",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from . import strategies

        if v not in strategies.REGISTRY:
            raise ValueError(f"must be one of {', '.join(strategies.names())}")
        return v

    @field_validator("protect", mode="before")
    @classmethod
    def _parse_protect(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [] if v.strip() in ("", "none") else [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("protect_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            import regex

            try:
                regex.compile(v)
            except regex.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        """A preset fills in the options it names that were not given (the ones given win)."""
        from .arms import PRESETS

        if isinstance(values, dict) and values.get("preset") in PRESETS:
            return {**PRESETS[values["preset"]], **values}
        return values


class PruneOptions(SelectionOptions):
    scope: Literal["global", "batch"] = Field(
        "global",
        description="global: quantiles over the whole dataset; batch: per shuffled batch (as the paper, in training).",
    )
    batch_size: PosInt = Field(8, description="Batch size for --scope batch.")
    seed: NonNegInt = Field(0, description="Seed for batch shuffling and the random strategies.")
    keep_duplicates: bool = Field(
        False,
        description="Keep identical conversations as separate samples; by default only the first copy (by id) "
        "takes part and the others are counted as dropped duplicates.",
    )
    exclude_ids: str | None = Field(
        None,
        description="A text file of sample ids, one per line exactly as written, spaces included (as the explorer "
        "downloads a selection; # comments allowed), to leave out of the triage: never kept, listed as excluded in "
        "samples.parquet; the budget counts the others.",
    )
    allow_changed_input: bool = Field(
        False,
        description="Prune even though the scored input file changed after scoring (refused by default: the "
        "scores describe the old rows; score again instead).",
        json_schema_extra=RUNTIME,
    )
    group_by: str | None = Field(
        None,
        description="A column carried from the input (score --keep-fields): triage and exact budget within each group.",
    )
    group_ratios: dict[str, Ratio] = Field(
        default_factory=dict,
        description="Ratios per group with --group-by, e.g. source=math:0.2,chat:0.1 (others: --ratio).",
    )
    target_model: str | None = Field(
        None,
        description="Also carry the kept samples over to this model's tokenizer and chat template (into "
        "OUT/target, as `curate retokenize`), to train a model of another family than the scorer.",
        json_schema_extra=RUNTIME,
    )
    report: bool = Field(
        False, description="Also write the EU-plane report into OUT/report.", json_schema_extra=RUNTIME
    )
    workers: PosInt = Field(
        1,
        description="Processes writing the masks (pass 2) in parallel; the output is identical.",
        json_schema_extra=RUNTIME,
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where the --workers run: local processes, or tasks on a Ray cluster (see --address).",
        json_schema_extra=RUNTIME,
    )
    address: RayAddress = None

    @field_validator("group_ratios", mode="before")
    @classmethod
    def _parse_group_ratios(cls, v: Any) -> Any:
        return parse_group_ratios(v)

    @model_validator(mode="after")
    def _ratios_need_groups(self):
        if self.group_ratios and not self.group_by:
            raise ValueError("group_ratios needs group_by")
        return self


class PruneConfig(PruneOptions):
    scores: str = Field(description="Scores folder written by `curate score`.")
    out: str = Field(description="Folder for the pruned dataset (data/train-*.parquet, samples.parquet, stats.json).")


# ---------------------------------------------------------------- train

Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


class TrainOptions(Options):
    model: str | None = Field(
        None,
        description="Model to fine-tune: local folder or hub id; it must share the tokenizer the data was made with "
        "(default: the scoring model).",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the data (paper: 3).")
    max_steps: PosInt | None = Field(None, description="Stop after this many optimizer steps (overrides --epochs).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (paper: 1e-4 with LoRA).")
    batch_size: PosInt = Field(8, description="Samples per device batch.")
    grad_accum: PosInt = Field(1, description="Gradient accumulation steps (paper: 8 x 4).")
    lora_rank: int = Field(8, ge=0, description="LoRA rank (paper: 8); 0 = full fine-tuning.")
    lora_alpha: PosInt = Field(16, description="LoRA alpha.")
    warmup: float = Field(0.03, ge=0, description="Warm-up: a fraction of the steps (< 1) or a number of steps.")
    scheduler: Scheduler = Field("cosine", description="Learning-rate schedule.")
    seed: NonNegInt = Field(0, description="Seed for shuffling and initialisation.")
    device: Device = Field("auto", json_schema_extra=RUNTIME)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype: bfloat16 autocast (weights and optimizer stay float32) or float32; auto: "
        "bfloat16 on a GPU that supports it and on a CPU that computes it natively (AMX or AVX512-BF16), else float32.",
    )
    dynamic: bool = Field(
        False,
        description="Q-Tuning inside the trainer (the paper's protocol): every sample goes through the forward pass, "
        "and each micro-batch keeps --ratio of its samples and prunes their tokens in the loss, scored from the "
        "training forward's own logits by the model being trained. The selection options (--ratio, --token-ratio, "
        "--strategy random for the paper's random baseline, ...) are prune's, applied per micro-batch.",
    )
    selection: SelectionOptions = Field(
        default_factory=SelectionOptions,
        description="With dynamic: the triage and token rule applied to each micro-batch (prune's options).",
    )


class TrainConfig(TrainOptions):
    data: str = Field(
        description="The data: a `curate prune` folder, a `curate score` folder (every scored sample, whole; with "
        "--dynamic each micro-batch is triaged) or one Parquet file with input_ids and labels."
    )
    out: str = Field(description="Folder for the trained model (a plain transformers folder; LoRA is merged).")


# ---------------------------------------------------------------- refresh, report, export, inspect, verify


class RefreshOptions(Options):
    rounds: PosInt = Field(
        2, description="Rounds of score -> prune -> train; each scores the FULL input with the latest model."
    )
    train_cmd: str | None = Field(
        None,
        description="Your own training command instead of the built-in trainer; {data} (pruned folder), {model} "
        "(current model) and {out} (where to save the merged model) are filled in.",
    )

    @field_validator("train_cmd")
    @classmethod
    def _has_placeholders(cls, cmd):
        # {model} is optional: a command may name its base model itself.
        missing = [p for p in ("{data}", "{out}") if cmd is not None and p not in cmd]
        if missing:
            raise ValueError(f"the training command must contain {{data}} and {{out}}; missing {', '.join(missing)}")
        return cmd


class TrainCommandConfig(Options):
    command: str = Field(description="The training command; {data}, {model} and {out} are filled in.")
    data: str = Field(description="Pruned data: a `curate prune` folder.")
    model: str = Field(description="The model to start from (a folder or hub id).")
    out: str = Field(description="Where the command must save the trained model (merged, not a bare adapter).")


class RefreshConfig(RefreshOptions):
    input: str = Field(description="SFT data (as for `curate score`).")
    out: LocalFolder = Field(
        description="Run folder: round-NN/{scores,pruned,model}/ and _manifest.json with the summary (local)."
    )
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)


class ProbeOptions(Options):
    fraction: float = Field(0.2, gt=0, lt=1, description="Share of the rows corrupted (at least 2 rows).")
    corruptions: list[Literal["answer", "reply", "arguments"]] = Field(
        default_factory=lambda: ["answer", "reply", "arguments"],
        description="How rows are broken, comma-separated (each row by one that applies to it): answer (a single-turn "
        "row gets another row's answer), reply (a multi-turn row's last free-text reply becomes another "
        "conversation's), arguments (the numbers in a tool call's arguments are changed).",
    )
    ratio: Ratio = Field(0.25, description="Sample budget of every strategy, as `curate prune --ratio`.")
    seeds: list[NonNegInt] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Corruption seeds, comma-separated: each corrupts other rows (scored once per seed); the table "
        "shows the mean and sd over them. Each is also the seed of the strategies.",
    )
    random_seeds: PosInt = Field(20, description="Draws of the random strategy per seed; the table shows their mean.")

    @field_validator("corruptions", mode="before")
    @classmethod
    def _parse_corruptions(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _parse_seeds(cls, v: Any) -> Any:
        if isinstance(v, str):  # `--seeds 0,1,2`
            return [int(p) if p.strip().isdigit() else p for p in v.split(",") if p.strip()]
        return v


class ProbeConfig(ProbeOptions):
    input: str = Field(description="The data set to probe (any input format `curate score` reads).")
    out: str = Field(description="Folder: corrupted.jsonl, corrupted.json, scores/, probe.json and probe.md.")
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    prune: PruneOptions = Field(default_factory=PruneOptions)


class ReportConfig(Options):
    run: str = Field(
        description="A run folder (scores/ + pruned/), a `curate prune` folder, or a `curate refresh` folder."
    )
    out: str | None = Field(None, description="Where to write the report (default: RUN/report).")
    examples: int = Field(3, ge=0, description="Example samples shown per quadrant, token by token.")
    turns: bool = Field(
        False,
        description="Also draw, on the EU-plane picture, each multi-turn example's assistant turns joined to its "
        "conversation's point (off by default: on tool-call data the lines crowd the plane).",
    )


class ExportConfig(Options):
    pruned: str = Field(description="A `curate prune` output folder.")
    format: Literal["llamafactory", "axolotl", "trl", "jsonl"] = Field(
        description="llamafactory (save_to_disk for tokenized_path), axolotl (pre-tokenised JSONL), trl (Parquet with "
        "labels), jsonl (every column)."
    )
    out: str = Field(description="Folder for the exported data and its config snippet.")


class RetokenizeConfig(Options):
    pruned: str = Field(description="A `curate prune` output folder.")
    model: str = Field(
        description="The target model (local folder or hub id) whose tokenizer and chat template to use."
    )
    out: str = Field(description="Folder for the re-tokenised pruned dataset (same layout as `curate prune`).")
    max_length: PosInt | None = Field(None, description="Truncate longer target sequences (default: no limit).")


# ---------------------------------------------------------------- experiments


def _known_arm(v: str) -> str:
    from .arms import arm_names

    if v not in arm_names():
        raise ValueError(f"no arm named {v!r} (arms: {', '.join(arm_names())})")
    return v


# An arm: one of the experiment's fixed rules (curate.arms.ARMS) or any registered sample strategy.
Arm = Annotated[str, AfterValidator(_known_arm)]
ALL_ARMS = ["full", "random", "qtuning", "qtuning-samples", "ppl-high", "ppl-low", "entropy-high", "entropy-low"]


class Budget(Options):
    ratio: Ratio = Field(description="Fraction of samples kept.")
    token_ratio: Ratio = Field(description="Fraction of tokens kept in the samples whose tokens are pruned.")
    arms: list[Arm] = Field(default_factory=lambda: list(ALL_ARMS), description="Arms trained at this budget.")


class EvalOptions(Options):
    data: str = Field(description="Held-out question/answer rows (e.g. GSM8K test.jsonl).")
    fields: FieldNames = None
    skip: NonNegInt = Field(
        0, description="Skip the first N usable rows: hold out the end of the training file (train on score.limit)."
    )
    limit: PosInt | None = Field(None, description="Rows for the answer NLL (default: all).")
    em_limit: int | None = Field(None, ge=0, description="Rows for GSM8K exact match (default: limit; 0: none).")
    max_new_tokens: PosInt = Field(320, description="Longest generated answer.")
    batch_size: PosInt = Field(16, description="Rows per generation batch.")
    device: Device = "auto"


class EvaluateConfig(EvalOptions):
    model: str = Field(description="The model to evaluate: a folder or hub id.")
    out: str = Field(description="Folder for eval.json and the manifest.")


class RobustnessOptions(Options):
    fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of training rows corrupted (given another row's answer)."
    )
    seed: NonNegInt = Field(1234, description="Which rows are corrupted, and with whose answers.")
    ratio: Ratio = Field(0.25, description="Sample budget of the robustness arms.")
    token_ratio: Ratio = Field(0.5, description="Token budget of the robustness arms.")
    train_arms: list[Arm] = Field(
        default_factory=lambda: ["full", "random", "qtuning"],
        description="Arms also trained and evaluated on the corrupted set.",
    )


class ExperimentConfig(Options):
    run_dir: LocalFolder = Field(description="Folder of the experiment: scores, one folder per arm, results.")
    train_data: str = Field(description="The training set (any input format).")
    score: ScoreOptions = Field(default_factory=ScoreOptions, description="Scoring (model, fields, limit, ...).")
    prune: PruneOptions = Field(
        default_factory=PruneOptions,
        description="Prune settings shared by every arm (each arm sets its own strategy and budget).",
    )
    train: TrainOptions = Field(default_factory=TrainOptions, description="Identical training settings for every arm.")
    budgets: list[Budget] = Field(
        default_factory=lambda: [Budget(ratio=0.25, token_ratio=0.5), Budget(ratio=0.125, token_ratio=0.5)]
    )
    equal: Literal["epochs", "steps"] = Field(
        "epochs",
        description="epochs: every arm trains train.epochs passes over its own data (a static subset takes fewer "
        "steps); steps: every arm trains as many optimizer steps as full data (train.max_steps, else train.epochs "
        "passes over every training row), the protocol behind the paper's gain (its code selects inside the "
        "trainer, on every step of full data).",
    )
    static_steps: Literal["batch", "epochs"] = Field(
        "batch",
        description="With equal: steps, how a static subset reaches full data's steps: batch (a batch of its kept "
        "share of train.batch_size, the same epochs: the forward compute shrinks with the data) or epochs (the same "
        "batch, more passes over the subset).",
    )
    seeds: list[NonNegInt] = Field(
        default_factory=lambda: [0], description="One training (and random pruning) per seed."
    )
    robustness: RobustnessOptions | None = None
    eval: EvalOptions


# ---------------------------------------------------------------- pipelines


def local_folder(value: str) -> str:
    """A folder that holds several stages' folders (a run, a refresh loop, an experiment) is local; each stage's own
    input and output may be a URL (`curate score ... --out s3://...`)."""
    if "://" in value and not value.startswith("file://"):
        raise ValueError("a run folder is local; give the stage commands URLs instead (curate score/prune --out URL)")
    return value.removeprefix("file://")


LocalFolder = Annotated[str, AfterValidator(local_folder)]


STEP_NAME = "name"  # beside a step's stage, the folder it writes: {prune: {ratio: 0.25}, name: quarter}
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def step_parts(step: dict) -> tuple[str, dict, str | None]:
    """(stage, options, the name given) of one of a pipeline's `steps`."""
    ((stage, options),) = [(key, value) for key, value in step.items() if key != STEP_NAME]
    return stage, options, step.get(STEP_NAME)


class Pipeline(Options):
    run_dir: LocalFolder = Field(description="The run folder: one folder per stage inside it.")
    score: ScoreSection | None = None
    prune: PruneOptions | None = None
    train: TrainOptions | None = None  # without refresh: train once on the pruned data into RUN_DIR/model
    refresh: RefreshOptions | None = None  # the loop: RUN_DIR/round-NN/{scores,pruned,model}
    # Or any registered stages, in order: [{STAGE: {options}, name: FOLDER}, ...] (name optional); each one's
    # inputs are the latest outputs of the kinds it asks for (a stage producing scores between score and prune is
    # pruned from), its folder its own (`curate.stages.run.step_folder`).
    steps: list[dict[str, Any]] | None = None

    @field_validator("steps")
    @classmethod
    def _one_stage_each(cls, steps: list[dict] | None) -> list[dict] | None:
        for i, step in enumerate(steps or []):
            stages = [key for key in step if key != STEP_NAME]
            if len(stages) != 1 or not isinstance(step[stages[0]], dict):
                raise ValueError(f"steps[{i}]: a step is {{STAGE: {{options}}}}, one stage each (and name: FOLDER)")
            name = step.get(STEP_NAME)
            if name is not None and not (isinstance(name, str) and FOLDER_NAME.fullmatch(name)):
                raise ValueError(f"steps[{i}]: name {name!r} is not a plain folder name (letters, digits, . _ -)")
        return steps

    @model_validator(mode="after")
    def _stages_fit_together(self):
        if self.steps is not None:
            if any(getattr(self, s) is not None for s in ("score", "prune", "train", "refresh")):
                raise ValueError("give either steps or the score/prune/train/refresh sections, not both")
            if not self.steps:
                raise ValueError("steps lists no stage")
            return self
        if self.score is None:
            raise ValueError("a pipeline needs a score section (or steps)")
        if (self.train or self.refresh) and self.prune is None:
            raise ValueError("train and refresh need a prune section (they train on the pruned data)")
        return self


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise CurateError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CurateError(f"{path}: no such file") from None
    except OSError as e:
        raise CurateError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CurateError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        raise CurateError(f"{path}: invalid YAML: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CurateError(f"--set {item!r}: expected key.path=value, e.g. prune.ratio=0.25")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CurateError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        _set_path(raw, key.strip(), parsed)
    return raw


# A config file's paths are relative to the file, not to where the command runs (`curate run pipelines/gsm8k.yaml`
# works from any folder). Which keys are paths follows from the stages, one rule for every form of file: each
# stage's declared inputs and output folder (`Stage.places`), for the file's own stage, for each section named after
# a stage (score:, prune:, train:) and for each of `steps:`. A model names a hub id as often as a folder: it is
# resolved only when it looks like a path or names one there. A URL is where it is.


def resolve_path(value: str, base: Path, model: bool = False) -> str:
    """One path-valued option, made absolute against `base`; each of a comma-separated list of files."""
    if not value or value == "demo" or "://" in value:
        return value
    if "," in value and not (base / value).exists():
        return ",".join(resolve_path(part.strip(), base, model) for part in value.split(","))
    local = Path(value).expanduser()
    if model and not (value.startswith((".", "/", "~")) or (base / local).exists()):
        return value  # a hub id
    try:
        return str((base / local).resolve())
    except RuntimeError:  # a symbolic link loop: the stage that uses the path names it
        return str((base / local).absolute())


def resolve_paths(raw: dict, base: Path, stage) -> dict:
    """`raw`, a config of `stage` read from a file in `base`, with its paths made absolute against `base`; `--set`
    values are the user's own, relative to where they type them, and are applied after this."""
    from .registry import all_stages

    for field, model in stage.places():
        *parents, last = field.split(".")
        section = raw
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and isinstance(section.get(last), str):
            section[last] = resolve_path(section[last], base, model)
    stages = all_stages()
    steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    for part in [raw, *(step for step in steps if isinstance(step, dict))]:
        for key, value in part.items():
            if key in stages and isinstance(value, dict):  # a section or a step: that stage's options
                resolve_paths(value, base, stages[key])
    return raw


def load_model(name: str, path: Path, overrides: list[str] | None = None, what: str = "config"):
    """A YAML file validated as the config of the stage `name`, with its paths relative to the file and `--set
    key.path=value` overrides; every error at once."""
    from .registry import get

    stage = get(name)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise CurateError(f"{path}: a {what} is a mapping of sections")
    raw = apply_overrides(resolve_paths(raw, path.parent, stage), overrides or [])
    try:
        return stage.config.model_validate(raw)
    except ValidationError as e:
        raise CurateError(config_errors(f"{path}: {what}", e)) from None


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    return load_model("run", path, overrides, "pipeline config")


KEYED_FIELDS = {"group_ratios"}  # options whose value is a mapping: what follows them in an error's place is a key


def config_errors(where: str, e: ValidationError, option_names: bool = False) -> str:
    """One line per problem with its key path (`prune.ratio`) or, for the CLI, its option (`--ratio`)."""

    def place(loc) -> str:
        path = ".".join(str(p) for p in loc) or "(top level)"
        names = [p for p in loc if isinstance(p, str)]
        keyed = next((i for i, name in enumerate(names) if name in KEYED_FIELDS), None)
        if option_names and keyed is not None:  # `--group-ratios math`, not `--math`: the key is the user's data
            return f"--{names[keyed].replace('_', '-')} {'.'.join(names[keyed + 1 :])}".rstrip()
        if option_names and names:  # the option, and for a sectioned command the key it sets
            option = "--" + names[-1].replace("_", "-")
            return option if len(loc) == 1 else f"{option} ({path})"
        return path

    lines = [f"  {place(err['loc'])}: {_message(err)}" for err in e.errors()]
    return f"{where}: {len(lines)} problem(s):\n" + "\n".join(lines)


def _message(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "literal_error":
        msg = "must be one of " + re.sub(r"^Input should be ", "", msg).replace("'", "")
    elif err["type"] == "missing":
        msg = "is required"
    return msg.removeprefix("Value error, ")
