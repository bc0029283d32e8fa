"""Pipeline configs: YAML -> typed, validated stage configs. Every error is reported at once, with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CurateError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreSection(_Strict):
    input: str = Field(description="input file/folder, or `demo` for the built-in demo data")
    model: Optional[str] = None
    backend: Literal["auto", "hf"] = "auto"
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt-completion", "pairs"] = "auto"
    fields: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)
    max_length: int = Field(2048, ge=2)
    batch_tokens: int = Field(4096, ge=2)
    shard_size: int = Field(512, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    on_bad_row: Literal["skip", "fail"] = "skip"


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


class Pipeline(_Strict):
    run_dir: str
    score: ScoreSection
    prune: Optional[PruneSection] = None


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
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise CurateError(f"{path}: {len(lines)} problem(s) in the pipeline config:\n" + "\n".join(lines)) from None
