"""Every stage's options, each beside its stage: `curate.config.NAME` holds the options of the built-in stage NAME
(`selection`: the triage and token rule that prune and the in-trainer loss share), `curate.config.base` what they
all share and the YAML loader. The option models and the common types are re-exported here (`from curate.config
import PruneConfig`); code inside q-curate imports the module it needs."""

from .base import (
    KEYED_FIELDS,
    RUNTIME,
    Device,
    FieldNames,
    LocalFolder,
    NonNegInt,
    Options,
    PosInt,
    Ratio,
    RayAddress,
    apply_overrides,
    config_errors,
    load_model,
    local_folder,
    read_yaml,
    resolve_path,
    resolve_paths,
)
from .evaluate import EvalOptions, EvaluateConfig
from .experiment import ALL_ARMS, Arm, Budget, ExperimentConfig, RobustnessOptions
from .export import ExportConfig
from .probe import ProbeConfig, ProbeOptions
from .prune import PruneConfig, PruneOptions, parse_group_ratios
from .refresh import RefreshConfig, RefreshOptions, TrainCommandConfig
from .report import ReportConfig
from .retokenize import RetokenizeConfig
from .run import FOLDER_NAME, STEP_NAME, Pipeline, load_pipeline, step_parts
from .score import DTYPE_ALIASES, SCORE_OPTIONS, Dtype, ScoreConfig, ScoreOptions, ScoreSection
from .selection import SelectionOptions
from .train import Scheduler, TrainConfig, TrainOptions

__all__ = [
    "ALL_ARMS",
    "DTYPE_ALIASES",
    "FOLDER_NAME",
    "KEYED_FIELDS",
    "RUNTIME",
    "SCORE_OPTIONS",
    "STEP_NAME",
    "Arm",
    "Budget",
    "Device",
    "Dtype",
    "EvalOptions",
    "EvaluateConfig",
    "ExperimentConfig",
    "ExportConfig",
    "FieldNames",
    "LocalFolder",
    "NonNegInt",
    "Options",
    "Pipeline",
    "PosInt",
    "ProbeConfig",
    "ProbeOptions",
    "PruneConfig",
    "PruneOptions",
    "Ratio",
    "RayAddress",
    "RefreshConfig",
    "RefreshOptions",
    "ReportConfig",
    "RetokenizeConfig",
    "RobustnessOptions",
    "Scheduler",
    "ScoreConfig",
    "ScoreOptions",
    "ScoreSection",
    "SelectionOptions",
    "TrainCommandConfig",
    "TrainConfig",
    "TrainOptions",
    "apply_overrides",
    "config_errors",
    "load_model",
    "load_pipeline",
    "local_folder",
    "parse_group_ratios",
    "read_yaml",
    "resolve_path",
    "resolve_paths",
    "step_parts",
]
