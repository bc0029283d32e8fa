"""Pipeline configs: YAML -> typed, validated stage configs. Every error is reported at once, with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CurateError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreSection(_Strict):
    input: str = Field(description="input file/folder, or `demo` for the built-in demo data")
    model: Optional[str] = None
    backend: Literal["auto", "hf", "vllm"] = "auto"
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt-completion", "pairs"] = "auto"
    fields: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)
    max_length: int = Field(2048, ge=2)
    batch_tokens: int = Field(4096, ge=2)
    shard_size: int = Field(512, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    on_bad_row: Literal["skip", "fail"] = "skip"
    # vLLM engine options (the transformers backend ignores them)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    max_num_batched_tokens: Optional[int] = Field(None, ge=1)
    max_model_len: Optional[int] = Field(None, ge=2)
    enforce_eager: Optional[bool] = None
    vllm_entropy: Literal["exact", "topk"] = "exact"


class PruneSection(_Strict):
    ratio: float = Field(0.125, gt=0, le=1)
    token_ratio: float = Field(0.5, gt=0, le=1)
    lam: float = Field(0.5, ge=0, le=1)
    scope: Literal["global", "batch"] = "global"
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    entropy_positions: Literal["response", "all"] = "response"
    token_order: Literal["drop-high", "drop-low"] = "drop-high"
    strategy: Literal["qtuning", "random", "ppl-high", "ppl-low", "entropy-high", "entropy-low"] = "qtuning"
    token_strategy: Literal["qtuning", "random", "ppl", "none"] = "qtuning"


class TrainSection(_Strict):
    epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lora_rank: int = Field(8, ge=0)
    lora_alpha: int = Field(16, ge=1)
    warmup: float = Field(0.03, ge=0)
    scheduler: str = "cosine"
    seed: int = 0
    device: str = "auto"


class RefreshSection(_Strict):
    rounds: int = Field(2, ge=1)
    train_cmd: Optional[str] = Field(None, description="shell command with {data}, {model} and {out}; "
                                     "default: the built-in trainer with the train section")

    @field_validator("train_cmd")
    @classmethod
    def _has_placeholders(cls, cmd):
        # {model} is optional: a command may name its base model itself.
        missing = [p for p in ("{data}", "{out}") if cmd is not None and p not in cmd]
        if missing:
            raise ValueError(f"the training command must contain {{data}} and {{out}}; missing {', '.join(missing)}")
        return cmd


class Pipeline(_Strict):
    run_dir: str
    score: ScoreSection
    prune: Optional[PruneSection] = None
    train: Optional[TrainSection] = None  # without refresh: train once on the pruned data into RUN_DIR/model
    refresh: Optional[RefreshSection] = None  # the loop: RUN_DIR/round-NN/{scores,pruned,model}

    @model_validator(mode="after")
    def _stages_fit_together(self):
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


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise CurateError(f"{path}: no such pipeline file") from None
    except yaml.YAMLError as e:
        raise CurateError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise CurateError(f"{path}: a pipeline is a mapping with run_dir, score and prune sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CurateError(f"--set {item!r}: expected key.path=value, e.g. prune.ratio=0.25")
        _set_path(raw, key.strip(), yaml.safe_load(value))
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        raise CurateError(config_errors(f"{path}: pipeline config", e)) from None


def config_errors(where: str, e: ValidationError) -> str:
    lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
    return f"{where}: {len(lines)} problem(s):\n" + "\n".join(lines)
