"""Command-line flags made from a config dataclass, and the config made back from the parsed flags.

Each field becomes one flag, ``num_slots`` -> ``--num-slots``, typed from its annotation, with the
field's ``metadata["help"]`` and its default as help, so that a field added to a config is on the
command line at once and the flag cannot drift from the field. Annotations understood: ``int``,
``float``, ``str``, ``bool`` (``--x`` / ``--no-x``), ``Literal[...]`` (choices), ``X | None``,
``tuple[X, ...]`` and ``list[X]`` (one or more values), ``tuple[X, X]`` (exactly two), and
``list[X] | X`` (one value stays a single X).

Field metadata read here:

- ``help`` (required): the help text. "(default X)" is appended, but not for a None default: the
  text says what leaving the flag out means.
- ``flag``: the flag's spelling where it is not ``--field-name`` (``--lr`` for ``learning_rate``).
- ``off_flag``: a bool flag's "off" spelling instead of ``--no-x`` (``--freeze-compressor``).
- ``cli``: False keeps the field off the command line (mappings, provenance, preset markers).

A flag left out stays out of the parsed namespace (argparse.SUPPRESS), so ``config_from_args``
replaces only the fields the user gave: a value from a ``--config`` file or a preset is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal


class _OnOffAction(argparse.BooleanOptionalAction):
    """``--x`` / ``OFF`` instead of ``--x`` / ``--no-x``, for a field whose metadata names ``off_flag``."""

    def __init__(self, option_strings: list[str], dest: str, off_flag: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.option_strings = [option_strings[0], off_flag]

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string == self.option_strings[0])


def cli_fields(config_type: type) -> list[dataclasses.Field]:
    """The fields of ``config_type`` that have a flag (all but those with ``metadata["cli"]`` False)."""
    return [f for f in dataclasses.fields(config_type) if f.metadata.get("cli", True)]


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def add_config_flags(
    parser: argparse._ActionsContainer,
    config_type: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    flag_names: Mapping[str, str] | None = None,
    variants: Mapping[str, Any] | None = None,
) -> None:
    """Add a flag to ``parser`` (a parser or an argument group) for each flag field of ``config_type``.

    ``only`` / ``skip``: the fields to map, by name (``only`` in its order, default all of them).
    ``flag_names``: this command's spelling of some fields' flags (``{"eval_batch_size": "--batch-size"}``).
    ``variants``: ``{flag: config}`` presets the command offers (``{"--quick": QUICK}``); where a preset's
    value differs from the default the help says so: "(default 1024; 128 with --quick)".
    """
    hints = typing.get_type_hints(config_type)
    by_name = {f.name: f for f in cli_fields(config_type)}
    names = list(by_name) if only is None else list(only)
    for name in names:
        if name in skip:
            continue
        field = by_name[name]
        if "help" not in field.metadata:
            raise TypeError(f"{config_type.__name__}.{name}: no metadata['help'] for its flag")
        flag = (flag_names or {}).get(name) or flag_name(field)
        options, _ = _argument(hints[name], f"{config_type.__name__}.{name}")
        if "off_flag" in field.metadata:
            if options.get("action") is not argparse.BooleanOptionalAction:
                raise TypeError(f"{config_type.__name__}.{name}: off_flag is for a bool field")
            options = {"action": _OnOffAction, "off_flag": field.metadata["off_flag"]}
        if "action" not in options and "choices" not in options:
            options["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        default = _default(field)
        if default is dataclasses.MISSING:
            options["required"] = True
        shown = [] if default in (None, dataclasses.MISSING) else [f"default {_shown(default)}"]
        for variant_flag, preset in (variants or {}).items():
            value = getattr(preset, name)
            if value != default:
                shown.append(f"{_shown(value)} with {variant_flag}")
        help_text = field.metadata["help"] + (f" ({'; '.join(shown)})" if shown else "")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, **options)


def config_from_args(args: argparse.Namespace, base: Any) -> Any:
    """``base`` with the fields the user gave on the command line replaced.

    ``base`` is a config (the defaults, a preset or a ``--config`` file's values) or a config class
    (built from the given flags alone, for a config with a required field). Every attribute of
    ``args`` named like a flag field of the config counts as given.
    """
    config_type = base if isinstance(base, type) else type(base)
    hints = typing.get_type_hints(config_type)
    given = {}
    for field in cli_fields(config_type):
        if hasattr(args, field.name):
            _, convert = _argument(hints[field.name], f"{config_type.__name__}.{field.name}")
            given[field.name] = convert(getattr(args, field.name))
    return config_type(**given) if isinstance(base, type) else dataclasses.replace(base, **given)


def _argument(annotation: Any, where: str) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """The add_argument options for a field's annotation, and how a parsed value becomes the field's."""
    annotation = _without_none(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}, _unchanged
    if annotation in (int, float, str):
        return {"type": annotation}, _unchanged
    if origin is Literal and len({type(a) for a in args}) == 1:
        return {"type": type(args[0]), "choices": args}, _unchanged
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "+"}, tuple
    if origin is tuple and args and len(set(args)) == 1:
        return {"type": args[0], "nargs": len(args)}, tuple
    if origin is list and len(args) == 1:
        return {"type": args[0], "nargs": "+"}, list
    if origin in (typing.Union, types.UnionType) and len(args) == 2:
        many, one = sorted(args, key=lambda a: typing.get_origin(a) is not list)
        if typing.get_origin(many) is list and typing.get_args(many) == (one,):
            return {"type": one, "nargs": "+"}, lambda values: values[0] if len(values) == 1 else list(values)
    raise TypeError(f"{where}: no command-line flag for the annotation {annotation!r}; mark it cli False")


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None``; anything else as it is."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return functools.reduce(operator.or_, rest)
    return annotation


def _unchanged(value: Any) -> Any:
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    """A default as one would type it: ``1e-4``, ``0.05``, ``20``, ``1000 10000``, on/off for a bool."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        if abs(value) < 0.01:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)
