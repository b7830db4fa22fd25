"""QuantSpec: what a quantized model's experts (and optionally shared experts / attention) are stored as."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FORMATS", "GROUPS", "INCLUDE", "QuantSpec"]

FORMATS = ("int8", "int4")
INCLUDE = ("shared", "attention")
GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """What ``moekit quantize`` did: ``fmt`` int8 | int4, ``group`` (int4: inputs per scale), ``include``
    (beyond the routed experts: "shared", "attention"), ``method`` gptq | rtn, calibration tokens."""

    fmt: str
    group: int | None = None
    include: tuple[str, ...] = ()
    method: str = "gptq"
    calib_tokens: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format={self.fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.fmt == "int4" and self.group not in GROUPS:
            raise ValueError(f"group={self.group} must be one of {GROUPS} for int4")
        if self.fmt == "int8" and self.group is not None:
            raise ValueError("group applies to int4 only (int8 has one scale per expert row)")
        bad = set(self.include) - set(INCLUDE)
        if bad:
            raise ValueError(f"include={sorted(bad)} is unknown; choose from {', '.join(INCLUDE)}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method={self.method!r} is unknown; choose gptq or rtn")
        object.__setattr__(self, "include", tuple(self.include))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"include": list(self.include)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(**{**d, "include": tuple(d.get("include", ()))})
