"""Frozen, validated configuration dataclasses. Imports nothing of moekit.

Every error names the field, the value and the allowed range, so a bad config fails where it is
written, not deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MoEConfig", "ROUTERS", "ACTIVATIONS", "DROP_POLICIES", "TOKEN_CHOICE_ROUTERS"]

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias", "dense")
TOKEN_CHOICE_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias")
ACTIVATIONS = ("swiglu", "gelu", "relu")
DROP_POLICIES = ("probs", "position")
EXPERT_IMPLS = ("fused", "loop")
SCORE_FUNCS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward block: router + routed experts (+ optional shared experts).

    Defaults follow Mixtral (softmax top-2, renormalised, dropless) with Switch/ST-MoE loss weights.
    """

    d_model: int
    d_hidden: int
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    activation: str = "swiglu"
    norm_topk: bool = True
    # None = dropless for token-choice routers; expert_choice then uses 1.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    importance_loss_coef: float = 0.0
    # DeepSeek-V3 sequence-level balance loss replaces the batch-level one when the input is (B, S, D)
    seq_aux: bool = False
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    # DeepSeek-V3 group-limited routing (sigmoid_bias): experts split into n_group groups, the
    # topk_group best groups (by the sum of their top-2 biased scores) are eligible
    n_group: int = 1
    topk_group: int = 1
    # Switch Transformer: multiplicative U(1-eps, 1+eps) noise on the router input, training only
    router_jitter: float = 0.0
    num_shared_experts: int = 0
    shared_d_hidden: int | None = None  # per shared expert; None = d_hidden
    shared_gate: bool = False
    expert_impl: str = "fused"  # "fused" autograd op or "loop" readable reference
    # sigmoid_bias only: the scores that are biased to choose and gathered as weights. "sigmoid" is
    # DeepSeek-V3; "softmax" is ERNIE 4.5 (renormalised by sum.clamp_min(1e-12) instead of sum + 1e-20)
    score_func: str = "sigmoid"

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")

        for name in ("d_model", "d_hidden", "num_experts", "n_group", "topk_group"):
            positive(name)
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is unknown; choose one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; choose one of {ACTIVATIONS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={self.drop_policy!r} is unknown; choose one of {DROP_POLICIES}")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl={self.expert_impl!r} is unknown; choose one of {EXPERT_IMPLS}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={self.score_func!r} is unknown; choose one of {SCORE_FUNCS}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k!r} must be in [1, num_experts={self.num_experts}]")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"router='switch' routes each token to one expert: top_k={self.top_k} must be 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor={self.capacity_factor!r} must be > 0 (or None for dropless routing)"
            )
        for name in ("aux_loss_coef", "z_loss_coef", "importance_loss_coef", "bias_update_rate", "router_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not self.router_jitter < 1:
            raise ValueError(f"router_jitter={self.router_jitter!r} must be in [0, 1)")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor!r} must be > 0")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(
                f"top_k={self.top_k} exceeds the experts in topk_group={self.topk_group} groups of "
                f"{self.num_experts // self.n_group}; raise topk_group"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_d_hidden is not None and self.shared_d_hidden < 1:
            raise ValueError(f"shared_d_hidden={self.shared_d_hidden} must be >= 1 (or None = d_hidden)")

    @property
    def is_token_choice(self) -> bool:
        return self.router in TOKEN_CHOICE_ROUTERS

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def shared_hidden_total(self) -> int:
        """Hidden width of the shared MLP: the shared experts' hidden sizes add up."""
        return self.num_shared_experts * (self.shared_d_hidden or self.d_hidden)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MoEConfig has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)
