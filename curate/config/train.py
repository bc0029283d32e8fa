"""`curate train`'s options: the built-in trainer, and the in-trainer selection (`--dynamic`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import RUNTIME, Device, NonNegInt, Options, PosInt
from .selection import SelectionOptions

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
        "--preset paper --strategy random --token-strategy random for the paper's random baseline, ...) are prune's, "
        "applied per micro-batch; a micro-batch keeps max(1, round(ratio x batch)) samples, so a small --batch-size "
        "keeps more than --ratio (the log says how many).",
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
