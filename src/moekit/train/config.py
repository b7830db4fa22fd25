"""Training-run configuration (a frozen dataclass; CLI flags are generated from its fields)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eval_interval: int = 100
    eval_batches: int = 16
    ckpt_interval: int = 100
    log_every: int = 1
    seed: int = 0
    data: str | None = None  # None = the running Python's standard library sources
    vocab_size: int = 4096
    max_data_bytes: int = 16_000_000
    threads: int | None = None
    compile: bool = False  # torch.compile the model (inductor): ~25 s to compile, ~7% faster steps by default
    # collapse detection (see moekit.analysis)
    dead_threshold: float = 0.02  # an expert below this share of its layer's assignments ...
    hot_threshold: float = 0.6  # ... or one expert above this share ...
    collapse_window: int = 50  # ... for this many consecutive steps is flagged
    fail_on_collapse: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches", "ckpt_interval",
                     "log_every", "vocab_size", "collapse_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
