"""RopeScaling: how RoPE's frequencies are stretched past the context a model was trained on."""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config.base import ConfigBase, setting

__all__ = ["ROPE_TYPES", "RopeScaling"]

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeScaling(ConfigBase):
    """Frequency scaling of RoPE, as transformers' ``rope_parameters`` describe it (see moekit.nn.rope).

    ``linear``: every frequency / factor. ``dynamic`` (NTK): the base grows with the sequence once it
    passes ``original_max_position_embeddings``. ``yarn``: low frequencies interpolated, high ones kept,
    a ramp between (``beta_fast`` / ``beta_slow`` rotations), cos and sin scaled by ``attention_factor``.
    ``llama3``: long wavelengths / factor, short ones kept, a smooth blend between. ``longrope`` (Phi):
    each frequency divided by its own factor, ``short_factor`` within the original context and
    ``long_factor`` past it, cos and sin scaled by ``short_mscale`` / ``long_mscale`` (or the attention factor).
    """

    kind = "RoPE scaling"

    rope_type: str = setting("yarn", "the scaling method", choices=ROPE_TYPES)
    factor: float = setting(1.0, "context extension factor")
    original_max_position_embeddings: int = setting(4096, "the context the model was pretrained on")
    beta_fast: float = setting(32.0, "yarn: rotations above which frequencies are kept")
    beta_slow: float = setting(1.0, "yarn: rotations below which frequencies are interpolated")
    truncate: bool = setting(True, "yarn: round the correction range to whole dimensions")
    attention_factor: float | None = setting(
        None, "yarn: the cos / sin multiplier; none = 0.1 ln(factor) + 1, or the mscale ratio when both "
        "mscale and mscale_all_dim are set")
    mscale: float | None = setting(None, "yarn (DeepSeek): numerator multiplier of ln(factor)")
    mscale_all_dim: float | None = setting(None, "yarn (DeepSeek): denominator multiplier of ln(factor)")
    low_freq_factor: float = setting(1.0, "llama3: wavelengths above original / this are divided by factor")
    high_freq_factor: float = setting(4.0, "llama3: wavelengths below original / this are kept")
    short_factor: tuple[float, ...] | None = setting(None, "longrope: per-frequency divisors within the "
                                                     "original context")
    long_factor: tuple[float, ...] | None = setting(None, "longrope: per-frequency divisors past it")
    short_mscale: float | None = setting(None, "longrope: the cos / sin multiplier within the original context; "
                                         "none = the attention factor")
    long_mscale: float | None = setting(None, "longrope: the cos / sin multiplier past it")

    def __post_init__(self) -> None:
        self._check_choices()
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.rope_type == "longrope" and (self.short_factor is None or self.long_factor is None
                                             or len(self.short_factor) != len(self.long_factor)):
            raise ValueError("rope_scaling longrope needs short_factor and long_factor, one entry per frequency")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor!r} must be > 0")
        if self.rope_type in ("dynamic", "llama3") and self.factor < 1:
            raise ValueError(f"rope_scaling.factor={self.factor!r} must be >= 1 for {self.rope_type}")
        n = self.original_max_position_embeddings
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"rope_scaling.original_max_position_embeddings={n!r} must be an integer >= 1")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor} > 0"
            )
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"rope_scaling.attention_factor={self.attention_factor!r} must be > 0 (or None)")
