"""The Python API: `curate.score(...)`, `curate.prune(...)`, ... run the registered stages with the CLI's
options as keyword arguments (same names, same validation, same lifecycle) and return their typed results.

    import curate
    scores = curate.score("train.jsonl", out="run/scores")  # the main input as on the command line, or input=...
    pruned = curate.prune(scores="run/scores", out="run/pruned", ratio=0.125)
    print(pruned.stats["K"], pruned.files[0]["name"])
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pydantic import ValidationError

from .config.base import config_errors
from .errors import CurateError
from .executor import execute
from .progress import Reporter
from .registry import all_stages
from .stage import Manifest


def stage_function(attribute: str):
    """The API function of the stage named `attribute` (`train_command` for `train-command`)."""
    stage = all_stages().get(attribute.replace("_", "-"))
    if stage is None or attribute.startswith("_"):
        raise AttributeError(f"module 'curate' has no attribute {attribute!r}")

    def call(*arguments: Any, force: bool = False, reporter: Reporter | None = None, **options: Any) -> Manifest:
        names = stage.cli.arguments  # given positionally, as on the command line
        if len(arguments) > len(names):
            takes = f"{', '.join(names)} positionally" if names else "no positional argument"
            raise TypeError(f"curate.{attribute}() takes {takes}; give the other options by keyword (out=..., ...)")
        if twice := sorted(set(names[: len(arguments)]) & set(options)):
            raise TypeError(f"curate.{attribute}() got {', '.join(twice)} both positionally and by keyword")
        options = {**dict(zip(names, arguments)), **options}
        values = {k: str(v) if isinstance(v, PurePath) else v for k, v in options.items()}
        try:
            cfg = stage.config.model_validate(values)
        except ValidationError as e:
            raise CurateError(config_errors(f"curate.{attribute}()", e)) from None
        return execute(stage, cfg, reporter, force)

    call.__name__ = attribute
    positional = f"{', '.join(stage.cli.arguments)} positionally or by keyword, " if stage.cli.arguments else ""
    named = f"the options of `curate {stage.name}` ({stage.config.__name__})"
    call.__doc__ = f"{stage.doc}\n\nArguments: {positional}{named} by keyword."
    return call
