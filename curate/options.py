"""Typer commands built from the config models, so an option's type, default, choices and help exist once.

`command(Model, arguments=("input",))` turns a function `f(cfg: Model, **extras)` into a Typer command whose
options are the model's fields (and the `extras` declared on `f` itself, such as `--force`). Bad choices are
rejected by Typer before any work; everything else is validated by the model, all problems at once, named
by their option.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

import typer
from pydantic import BaseModel, ValidationError

from .config.base import config_errors, former_name

SIMPLE = (str, int, float, bool)


def _cli_type(annotation: Any) -> Any:
    """The Typer-facing type of a field: simple types and Literals as they are; anything else is read as a string
    that the model's own validator parses (e.g. `--group-ratios math:0.2,chat:0.1`)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _cli_type(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _cli_type(inner[0]) | None if len(inner) == 1 else str | None
    if origin is Literal or annotation in SIMPLE:
        return annotation
    return str | None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_params(
    model: type[BaseModel],
    arguments: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    first: tuple[str, ...] = (),
) -> list[inspect.Parameter]:
    """Typer parameters for the fields of `model`: `arguments` are positional, `first` are listed first. A name
    that is no field of `model` is a mistake in the command's declaration, refused when it is built."""
    unknown = [n for n in (*arguments, *first, *(only or ())) if n not in model.model_fields]
    if unknown and only is not None:  # with a subset, `arguments` and `first` may name another section's fields
        unknown = [n for n in only if n not in model.model_fields]
    if unknown:
        raise TypeError(f"{model.__name__} has no field {unknown[0]!r} (options: {', '.join(model.model_fields)})")
    names = [n for n in model.model_fields if only is None or n in only]
    names = (
        [n for n in arguments if n in names]
        + [n for n in first if n in names]
        + [n for n in names if n not in arguments and n not in first]
    )
    params = []
    for name in names:
        field = model.model_fields[name]
        annotation = _cli_type(field.annotation)
        required = field.is_required()
        default = ... if required else field.get_default(call_default_factory=True)
        if isinstance(default, (list, dict)):  # collections are entered as one comma-separated string
            default = None
        if name in arguments:
            info = typer.Argument(default, help=field.description, show_default=not required, metavar=name.upper())
        elif annotation is bool or bool in typing.get_args(annotation):
            info = typer.Option(default, f"{flag(name)}/--no-{flag(name)[2:]}", help=field.description)
        else:
            # Unset, the option passes nothing and the model's default applies: a value the user did not type must
            # not override what `--preset` sets. --help still shows the default.
            shown = str(default) if not required and default is not None else False
            info = typer.Option(None if not required else ..., flag(name), help=field.description, show_default=shown)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
        if (old := former_name(field)) and name not in arguments:  # still read, unlisted; the model says it moved
            info = typer.Option(None, flag(old), hidden=True)
            params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return params


def build(model: type[BaseModel], values: dict) -> BaseModel:
    """The model from CLI values; every problem at once, named by its option, then exit code 2."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        typer.echo(f"error: {config_errors('options', e, option_names=True)}", err=True)
        raise typer.Exit(2) from None


def command(model: type[BaseModel], arguments: tuple[str, ...] = (), first: tuple[str, ...] = ()) -> Callable:
    """Decorate `f(cfg, **extras)`: the Typer signature is the model's fields plus f's own keyword parameters."""
    return sectioned_command(model, [(None, model, None)], arguments, first)


def sectioned_command(
    model: type[BaseModel],
    parts: list[tuple[str | None, type[BaseModel], tuple[str, ...] | None]],
    arguments: tuple[str, ...] = (),
    first: tuple[str, ...] = (),
) -> Callable:
    """`command` for a model with sections: `parts` lists (section, section model, fields exposed; None for all),
    a section of None meaning the top level. Each option still comes from the one field that defines it."""

    def decorate(f: Callable) -> Callable:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in inspect.signature(f).parameters.items()
            if name != "cfg"
        ]
        section_of: dict[str, str | None] = {}
        fields: list[inspect.Parameter] = []
        for section, sub, only in parts:
            for p in model_params(sub, arguments, only=only, first=first):
                if p.name in section_of:
                    raise TypeError(f"option --{p.name} is exposed twice")
                section_of[p.name] = section
                fields.append(p)

        @functools.wraps(f)
        def wrapper(**kwargs):
            extras = {p.name: kwargs.pop(p.name) for p in own}
            values: dict = {}
            for name, value in kwargs.items():
                if value is not None:  # unset: the model's default applies
                    target = values if section_of[name] is None else values.setdefault(section_of[name], {})
                    target[name] = value
            return f(build(model, values), **extras)

        params = fields + own
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read our signature, not f's
        return wrapper

    return decorate
