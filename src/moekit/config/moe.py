"""MoEConfig: one MoE feed-forward block (router + routed experts + optional shared experts)."""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config.base import ConfigBase, setting

__all__ = [
    "ACTIVATIONS",
    "DROP_POLICIES",
    "EXPERT_IMPLS",
    "ROUTERS",
    "SCORE_FUNCS",
    "TOKEN_CHOICE_ROUTERS",
    "MoEConfig",
]

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias", "dense")
TOKEN_CHOICE_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias")
ACTIVATIONS = ("swiglu", "gelu", "relu")
DROP_POLICIES = ("probs", "position")
EXPERT_IMPLS = ("fused", "loop")
SCORE_FUNCS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class MoEConfig(ConfigBase):
    """One MoE feed-forward block: router + routed experts (+ optional shared experts).

    Defaults follow Mixtral (softmax top-2, renormalised, dropless) with Switch/ST-MoE loss weights.
    """

    kind = "MoE"

    d_model: int = setting(help="model width the block reads and writes")
    d_hidden: int = setting(help="hidden width of each routed expert")
    num_experts: int = setting(8, "routed experts per MoE layer")
    top_k: int = setting(2, "experts each token is routed to")
    router: str = setting("topk", "how tokens choose experts", choices=ROUTERS)
    activation: str = setting("swiglu", "expert activation (swiglu is gated)", choices=ACTIVATIONS)
    norm_topk: bool = setting(True, "renormalise each token's top-k weights to sum to 1 (topk, sigmoid_bias)")
    capacity_factor: float | None = setting(
        None, "expert capacity as a multiple of the even share of tokens, overflow dropped; none = dropless "
        "for token-choice routers, 1.0 for expert_choice", training_only=True)
    drop_policy: str = setting("probs", "what an over-capacity expert keeps: its highest-weight assignments "
                               "(probs) or the earliest tokens, first choices first (position, GShard)",
                               training_only=True, choices=DROP_POLICIES)
    aux_loss_coef: float = setting(0.01, "load-balancing loss weight", training_only=True)
    z_loss_coef: float = setting(0.001, "router z-loss weight (ST-MoE)", training_only=True)
    importance_loss_coef: float = setting(0.0, "importance loss weight", training_only=True)
    seq_aux: bool = setting(False, "DeepSeek-V3 sequence-level balance loss in place of the batch-level one "
                            "when the input is (batch, seq, d_model)", training_only=True)
    routed_scaling_factor: float = setting(1.0, "multiplier on the routed experts' weights (DeepSeek-V3)")
    bias_update_rate: float = setting(1e-3, "step of the aux-loss-free expert-bias update (sigmoid_bias)",
                                      training_only=True)
    n_group: int = setting(1, "DeepSeek-V3 group-limited routing (sigmoid_bias): experts split into this "
                           "many groups")
    topk_group: int = setting(1, "groups eligible per token: those with the largest sum of their top-2 "
                              "biased scores")
    router_jitter: float = setting(0.0, "Switch multiplicative U(1-eps, 1+eps) noise on the router input, "
                                   "training only", training_only=True)
    num_shared_experts: int = setting(0, "shared (always-on) experts")
    shared_d_hidden: int | None = setting(None, "hidden width of each shared expert; none = d_hidden")
    shared_gate: bool = setting(False, "a per-token sigmoid gate on the shared experts' output")
    expert_impl: str = setting("fused", "the fused autograd op or the readable loop reference",
                               training_only=True, choices=EXPERT_IMPLS)
    score_func: str = setting(
        "sigmoid", "sigmoid_bias only: the scores biased to choose experts and gathered as weights; "
        "sigmoid is DeepSeek-V3, softmax is ERNIE 4.5 (renormalised by sum.clamp_min(1e-12))",
        choices=SCORE_FUNCS)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")

        for name in ("d_model", "d_hidden", "num_experts", "n_group", "topk_group"):
            positive(name)
        self._check_choices()  # router, activation, drop_policy, expert_impl, score_func
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
