"""Command-line options generated from a typed dataclass config, and the config read back.

Why: a config's fields, types and defaults are written once, in the dataclass the library and the
experiments use; the CLI cannot drift from them (a new field is a new flag, a changed default is the
flag's default). Field `name` becomes `--name` (underscores as dashes); the annotation gives the
type (int, float, str, Path, `X | None`, `tuple[X, ...]`/`list[X]` as several values, `Literal`
as choices, bool as a switch: `--name` when the default is False, `--no-name` when it is True); the
help comes from `field(metadata={"help": ...})` or a `name: text` line of the class docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

Config = TypeVar("Config")
SCALARS = (int, float, str, Path)


def flag(name: str) -> str:
    """The command-line flag of config field `name`."""
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type,
                       *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                       base: Any = None) -> None:
    """Add one option per field of dataclass `config_cls` (all, or `only` those, minus `exclude`).

    Defaults come from `base` (an instance) when given, else from the fields."""
    fields = _selected(config_cls, only, exclude)
    hints = typing.get_type_hints(config_cls)
    docs = _docstring_help(config_cls)
    for f in fields:
        default = getattr(base, f.name) if base is not None else _field_default(config_cls, f)
        text = f.metadata.get("help") or docs.get(f.name, "")
        kw = _argument(config_cls, f.name, hints[f.name], default, text)
        name = "--no-" + flag(f.name).removeprefix("--") if kw.get("action") == "store_false" else flag(f.name)
        parser.add_argument(name, dest=f.name, **kw)


def config_from_args(config_cls: type[Config], args: argparse.Namespace, *, base: Config | None = None,
                     **given: Any) -> Config:
    """The `config_cls` instance the parsed `args` describe: each field from `given`, else from
    `args` when it has an option there, else from `base` (or the field's default)."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            is_tuple = typing.get_origin(_strip_none(hints[f.name])[0]) is tuple
            values[f.name] = tuple(value) if is_tuple and value is not None else value
    return dataclasses.replace(base, **values) if base is not None else config_cls(**values)


def _selected(config_cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list:
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass: options are generated from dataclass configs")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    names = list(fields) if only is None else list(only)
    unknown = [n for n in [*names, *exclude] if n not in fields]
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no fields {unknown}")
    return [fields[n] for n in names if n not in set(exclude)]


def _field_default(config_cls: type, f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{config_cls.__name__}.{f.name} has no default: give it one or add its option by hand")


def _strip_none(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None was allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(typing.get_args(hint)):
            return rest[0], True
    return hint, False


def _scalar(config_cls: type, name: str, hint: Any) -> dict[str, Any]:
    """argparse `type` (and `choices` for a Literal) of one value of annotation `hint`."""
    if typing.get_origin(hint) is Literal:
        choices = list(typing.get_args(hint))
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or kinds.pop() not in SCALARS:
            raise TypeError(f"{config_cls.__name__}.{name}: a Literal option needs values of one scalar type")
        return {"type": type(choices[0]), "choices": choices}
    if hint in SCALARS:
        return {"type": hint}
    raise TypeError(f"{config_cls.__name__}.{name}: no command-line form for {hint!r}; exclude it and add "
                    "its option by hand")


def _argument(config_cls: type, name: str, hint: Any, default: Any, text: str) -> dict[str, Any]:
    """add_argument keywords for field `name` (its flag is added by the caller)."""
    inner, optional = _strip_none(hint)
    text = text.replace("%", "%%")
    if inner is bool:
        if optional or not isinstance(default, bool):
            raise TypeError(f"{config_cls.__name__}.{name}: a bool option needs a True or False default")
        return {"action": "store_false" if default else "store_true", "default": default, "help": text}
    if typing.get_origin(inner) in (tuple, list):
        args = typing.get_args(inner)
        if typing.get_origin(inner) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{config_cls.__name__}.{name}: only tuple[X, ...] has a command-line form")
        kw = _scalar(config_cls, name, args[0])
        return {**kw, "nargs": "+", "default": default, "help": _with_default(text, default)}
    kw = _scalar(config_cls, name, inner)
    if "choices" in kw and default is not None and default not in kw["choices"]:
        raise TypeError(f"{config_cls.__name__}.{name}: default {default!r} is not one of {kw['choices']}")
    return {**kw, "default": default, "help": _with_default(text, default)}


def _with_default(text: str, default: Any) -> str:
    if default is None or "default" in text:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
    return f"{text} (default {shown})" if text else f"(default {shown})"


def _docstring_help(config_cls: type) -> dict[str, str]:
    """`name: text` lines of the class docstring (text may continue on more-indented lines)."""
    helps: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    current, indent = None, 0
    for line in (config_cls.__doc__ or "").splitlines():
        m = re.match(r"^(\s*)(\w+): (.+)$", line)
        if m and m.group(2) in names:
            current, indent = m.group(2), len(m.group(1))
            helps[current] = m.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps
