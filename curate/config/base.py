"""What every stage's options share, and the YAML loader: the types options are made of (PosInt, Ratio, Device,
Engine, RUNTIME...), `Options` (strict, every problem at once), and reading a config file (`read_yaml`,
`apply_overrides`, `resolve_paths`, `load_model`, `config_errors`). Each stage's own options are beside it: a module of
`curate.config` for a built-in stage's (imported by the other stages and libraries that use them too), or the stage's
own module for a stage whose options no other module needs.

The CLI builds each command's options from these models (`curate.options`), pipeline YAML is validated against them,
and the stages read them. Choices are `Literal`s, so `--help` lists them and bad values are rejected before any work;
every problem is reported at once, with its option or key path.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import CurateError

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


def formerly(name: str) -> dict:
    """Declared on a renamed field (`json_schema_extra={**RUNTIME, **formerly("num_workers")}`): its former name is
    still read, in a file, in `curate.NAME(...)` and on the command line, with a one-line notice, and runs are
    fingerprinted under it (`curate.stage.fingerprinted`), so the rename changes no run's identity."""
    return {"formerly": name}


def former_name(field) -> str | None:
    extra = field.json_schema_extra
    return extra.get("formerly") if isinstance(extra, dict) else None


NOTICED: set[str] = set()


def notice(line: str) -> None:
    """A one-line notice on stderr, once per process."""
    if line not in NOTICED:
        NOTICED.add(line)
        print(f"note: {line}", file=sys.stderr)


Device = Annotated[
    str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when present), cpu, cuda or cuda:N.")
]
# Where a stage's workers run; the engine that runs them reads `Resources`, which the stage declares from these
# (`curate.stage.Resources`: engine, workers, gpus_per_worker, cpus_per_worker, address).
Engine = Annotated[
    Literal["local", "ray"],
    Field(
        description="local: this machine (see --workers for what runs there); ray: --workers Ray actors or tasks on a "
        "Ray cluster, over many GPUs and machines (see --address).",
        json_schema_extra=RUNTIME,
    ),
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
        from ..formats import parse_fields

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

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, values: Any) -> Any:
        """A renamed option given by its former name (`formerly`) is read as the new one, with a notice."""
        if not isinstance(values, dict):
            return values
        for name, field in cls.model_fields.items():
            old = former_name(field)
            if old is None or old not in values:
                continue
            if name in values:
                raise ValueError(f"{old} is the former name of {name}: give {name} only")
            values = {name if key == old else key: value for key, value in values.items()}
            notice(
                f"{old} (--{old.replace('_', '-')}) is now {name} (--{name.replace('_', '-')}); the old name still "
                "works, for now"
            )
        return values


def local_folder(value: str) -> str:
    """A folder that holds several stages' folders (a run, a refresh loop, an experiment) is local; each stage's own
    input and output may be a URL (`curate score ... --out s3://...`)."""
    if "://" in value and not value.startswith("file://"):
        raise ValueError("a run folder is local; give the stage commands URLs instead (curate score/prune --out URL)")
    return value.removeprefix("file://")


LocalFolder = Annotated[str, AfterValidator(local_folder)]


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
    from ..registry import all_stages

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
    from ..registry import get

    stage = get(name)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise CurateError(f"{path}: a {what} is a mapping of sections")
    raw = apply_overrides(resolve_paths(raw, path.parent, stage), overrides or [])
    try:
        return stage.config.model_validate(raw)
    except ValidationError as e:
        raise CurateError(config_errors(f"{path}: {what}", e)) from None


# Options whose value is a mapping: what follows them in an error's place is a key (the module declaring one adds it)
KEYED_FIELDS: set[str] = set()


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
