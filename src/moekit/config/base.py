"""What every config dataclass shares: dict / JSON round trips, ``replace``, and field metadata.

A field is declared with :func:`setting`, which keeps its help text (and whether it only tunes training,
and its allowed values) in the field's metadata. ``moekit train`` builds its flags from that metadata and
``--init-from`` reads ``training_only`` from it, so neither restates a field.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

__all__ = ["ConfigBase", "config_fields", "setting", "training_only_fields"]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            training_only: bool = False, choices: tuple[str, ...] | None = None,
            metavar: str | None = None) -> Any:
    """A dataclass field with its help text in ``metadata``.

    ``training_only``: changing the field leaves the parameters' shapes and meaning alone (loss weights,
    token dropping, ...), so a run started from another model's weights may change it. ``choices``: the
    allowed values of a str field (validated in ``__post_init__``; the CLI offers them).
    """
    meta = {"help": help, "training_only": training_only, "choices": choices, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigBase:
    """Mixin for a frozen config dataclass: ``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` /
    ``replace``. ``kind`` names the config in the error for a damaged JSON file."""

    kind = "the"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); the {cls.kind} config is damaged") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _check_choices(self) -> None:
        """Every field declared with ``choices`` holds one of them."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices, v = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and v not in choices:
                raise ValueError(f"{f.name}={v!r} is unknown; choose one of {choices}")


@functools.cache
def config_fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """``(field, resolved type)`` for each field of ``cls``: the type with its string annotation
    (``from __future__ import annotations``) evaluated, e.g. ``int | None``."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _nested_config(typ: Any) -> type | None:
    """The config class a field holds (``MoEConfig``, ``MLAConfig | None``), or None."""
    for t in (typ, *typing.get_args(typ)):
        if isinstance(t, type) and issubclass(t, ConfigBase):
            return t
    return None


@functools.cache
def training_only_fields(cls: type) -> frozenset[str]:
    """Names of the fields marked ``training_only``; a nested config's as ``"moe.aux_loss_coef"``."""
    out: set[str] = set()
    for f, typ in config_fields(cls):
        if f.metadata.get("training_only"):
            out.add(f.name)
        nested = _nested_config(typ)
        if nested is not None:
            out |= {f"{f.name}.{name}" for name in training_only_fields(nested)}
    return frozenset(out)
