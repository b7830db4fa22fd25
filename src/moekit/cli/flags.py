"""Command-line flags generated from config dataclass fields.

A flag's help, default, type and choices all come from its field (``moekit.config.setting``), so no flag
restates one. Under a prefix a field ``num_experts`` is ``--moe.num-experts``; an alias adds a short form
(``--experts``) that stores to the same place. The types a flag can parse, from the (string) annotations:
``int``, ``float``, ``str``, each ``| None`` (the word ``none`` gives None), ``bool`` (``--x`` / ``--no-x``)
and ``tuple[int, ...]`` (any number of values).
"""
from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from moekit.config import config_fields

__all__ = ["add_field_flags", "field_flags", "flag_name"]

_METAVARS = {int: "N", float: "X", str: "STR"}


def field_flags(cls: type, *, prefix: str | None = None, aliases: dict[str, str] | None = None,
                skip: Iterable[str] = ()) -> dict[str, str]:
    """Namespace dest -> field name for each field of ``cls`` that has a flag: the alias when the field
    has one (``aliases``: field -> short name), else ``prefix.field`` (or the field name alone)."""
    aliases, skip = aliases or {}, set(skip)
    return {aliases.get(f.name) or (f"{prefix}.{f.name}" if prefix else f.name): f.name
            for f, _ in config_fields(cls) if f.name not in skip}


def flag_name(dest: str) -> str:
    """The flag of a namespace dest: ``moe.seq_aux`` -> ``--moe.seq-aux``."""
    return "--" + dest.replace("_", "-")


def add_field_flags(group: argparse._ActionsContainer, defaults: Any, *, prefix: str | None = None,
                    aliases: dict[str, str] | None = None, skip: Iterable[str] = ()) -> None:
    """A flag per field of the config ``defaults`` (an instance: its values are the defaults shown)."""
    aliases, skip = aliases or {}, set(skip)
    dests = {name: dest for dest, name in field_flags(type(defaults), prefix=prefix, aliases=aliases,
                                                      skip=skip).items()}
    for f, typ in config_fields(type(defaults)):
        if f.name in skip:
            continue
        flags = [flag_name(f"{prefix}.{f.name}" if prefix else f.name)]
        if f.name in aliases:
            flags.append(flag_name(aliases[f.name]))
        kind, scalar, optional = _kind(typ, f"{type(defaults).__name__}.{f.name}")
        choices = f.metadata.get("choices")
        help_ = f.metadata.get("help") or f.name
        if choices:
            help_ += "; one of: " + ", ".join(choices)
        help_ = f"{help_} (default {_shown(getattr(defaults, f.name))})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": dests[f.name], "help": help_}
        if kind == "toggle":
            group.add_argument(*flags, action=_Toggle, **kw)
            continue
        kw["metavar"] = f.metadata.get("metavar") or ("NAME" if choices else _METAVARS[scalar])
        if kind == "list":
            kw["nargs"] = "*"
        group.add_argument(*flags, type=_parser(scalar, optional), choices=choices, **kw)


def _kind(typ: Any, where: str) -> tuple[str, type, bool]:
    """("toggle" | "value" | "list", scalar type, optional) of a resolved annotation."""
    optional = False
    if typing.get_origin(typ) in (types.UnionType, typing.Union):
        rest = [a for a in typing.get_args(typ) if a is not type(None)]
        optional = len(rest) < len(typing.get_args(typ))
        typ = rest[0] if len(rest) == 1 else typ
    if typ is bool and not optional:
        return "toggle", bool, False
    if typ in _METAVARS:
        return "value", typ, optional
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _METAVARS:
        return "list", args[0], False
    raise TypeError(f"{where}: a field of type {typ} has no flag form; skip it (set it with --config)")


def _parser(scalar: type, optional: bool) -> Callable[[str], Any]:
    if not optional:
        return scalar

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else scalar(text)

    parse.__name__ = scalar.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "empty"
    return str(value)


def _negated(flag: str) -> str:
    """--compile -> --no-compile; --model.tie-embeddings -> --model.no-tie-embeddings."""
    head, dot, tail = flag[2:].rpartition(".")
    return f"--{head}{dot}no-{tail}"


class _Toggle(argparse.Action):
    """A bool field: ``--x`` stores True, ``--no-x`` False (``--model.x`` / ``--model.no-x``)."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None,
                 **_: Any) -> None:
        self.negatives = [_negated(s) for s in option_strings]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string not in self.negatives)
