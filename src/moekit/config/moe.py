"""MoEConfig: one MoE feed-forward block (router + routed experts + optional shared experts)."""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config.base import ConfigBase, setting
from moekit.config.moe_options import check_router_options
from moekit.config.moe_routers import TOP_P_RULES, check_new_routers

__all__ = [
    "ACTIVATIONS",
    "BALANCE_SCOPES",
    "BIAS_UPDATES",
    "DROP_POLICIES",
    "EXPERT_IMPLS",
    "GROUP_SCORES",
    "ROUTERS",
    "SCORE_FUNCS",
    "TOKEN_CHOICE_ROUTERS",
    "TOP_P_RULES",
    "MoEConfig",
]

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias", "dense", "top_p", "relu",
           "hierarchical", "sinkhorn", "base", "hash", "soft", "sparsemixer")
TOKEN_CHOICE_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias", "top_p", "relu", "hierarchical",
                        "sinkhorn", "base", "hash", "sparsemixer")
ACTIVATIONS = ("swiglu", "gelu", "relu")
DROP_POLICIES = ("probs", "position")
EXPERT_IMPLS = ("fused", "loop")
SCORE_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("sum_top", "max")
BIAS_UPDATES = ("sign", "sign_centered", "quantile")
BALANCE_SCOPES = ("micro_batch", "global")


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
    # options on the existing routers, validated in moekit.config.moe_options
    group_score: str = setting(
        "sum_top", "how a group is scored for group-limited routing: the sum of its top "
        "ceil(top_k / topk_group) biased scores (sum_top, DeepSeek-V3) or its best one (max, DeepSeek-V2)",
        choices=GROUP_SCORES)
    group_score_top: int | None = setting(
        None, "sum_top only: how many of a group's best scores are summed; none = ceil(top_k / topk_group) "
        "(the DeepSeek-V3 checkpoints' code always sums 2)")
    bias_update: str = setting(
        "sign", "the sigmoid_bias expert-bias step: rate * sign(mean load - load) (sign, DeepSeek-V3), the "
        "same minus its mean (sign_centered), or quantile balancing of the scores (quantile; no rate)",
        training_only=True, choices=BIAS_UPDATES)
    balance_scope: str = setting(
        "micro_batch", "where the balance loss's load fractions f_e come from: each forward's own picks "
        "(micro_batch) or the picks of the whole optimizer step, summed over every --grad-accum micro-batch "
        "and every data-parallel rank (global, Qwen3; an extra no-grad forward per step when there is more "
        "than one micro-batch or rank)", training_only=True, choices=BALANCE_SCOPES)
    num_null_experts: int = setting(0, "null experts (AdaMoE, topk router): output 0, cost nothing, own logits")
    num_zero_experts: int = setting(0, "zero-computation experts that output 0 (MoE++, topk router)")
    num_copy_experts: int = setting(0, "zero-computation experts that output their input (MoE++, topk router)")
    num_constant_experts: int = setting(
        0, "zero-computation experts a1 x + a2 v, [a1, a2] = softmax(W_c x) (MoE++, topk router)")
    num_devices: int = setting(1, "expert groups (devices) the device and communication losses balance")
    device_loss_coef: float = setting(0.0, "DeepSeek-V2 device-level balance loss weight", training_only=True)
    comm_loss_coef: float = setting(0.0, "DeepSeek-V2 communication balance loss weight (M = topk_group)",
                                    training_only=True)
    # the dynamic, balanced and hierarchical routers, validated in moekit.config.moe_routers
    top_p: float = setting(0.4, "top_p: keep experts in probability order until their mass reaches top_p")
    top_p_rule: str = setting("ge", "top_p: the kept mass reaches top_p (ge, the paper) or exceeds it "
                              "(gt, the authors' code)", choices=TOP_P_RULES)
    max_k: int | None = setting(None, "top_p: at most this many experts per token; none = num_experts")
    entropy_loss_coef: float = setting(0.0, "top_p: weight of the mean router entropy in the loss",
                                       training_only=True)
    relu_l1_init: float = setting(1e-8, "relu (ReMoE): initial weight of the L1 sparsity regulariser",
                                  training_only=True)
    relu_l1_multiplier: float = setting(1.2, "relu: per-step factor on that weight, up while too dense, "
                                        "down while too sparse (target sparsity 1 - top_k/num_experts)",
                                        training_only=True)
    num_expert_groups: int = setting(1, "hierarchical: groups of num_experts / groups experts")
    group_top_k: int = setting(1, "hierarchical: groups chosen per token (then top_k experts in each)")
    sinkhorn_max_iter: int = setting(1000, "sinkhorn: iteration cap (more raises SinkhornError)",
                                     training_only=True)
    sinkhorn_tol: float = setting(1e-4, "sinkhorn: stop when every row sum is within this relative error",
                                  training_only=True)
    hash_seed: int = setting(0, "hash: seed of the uniform random token -> expert table")
    hash_balanced: bool = setting(False, "hash: build the table from the training data's token "
                                  "frequencies so expert loads are balanced", training_only=True)
    hash_vocab_size: int | None = setting(None, "hash: the table's length; none = the model's vocab_size")
    slots_per_expert: int = setting(1, "soft (Soft MoE): slots each expert processes per sequence")
    # gpt-oss's expert and router variants (checkpoint interop)
    router_bias: bool = setting(False, "a bias on the router logits")
    expert_ffn_bias: bool = setting(False, "biases on every expert's gate, up and down projections")
    swiglu_limit: float | None = setting(
        None, "gpt-oss's clamped SwiGLU: gate clamped to <= limit, up to [-limit, limit], output "
        "(up + 1) * gate * sigmoid(swiglu_alpha * gate); none = plain SwiGLU")
    swiglu_alpha: float = setting(1.702, "the clamped SwiGLU's sigmoid slope (with swiglu_limit)")
    output_bias: bool = setting(False, "a bias added once to the layer's output, whatever the routing (JetMoE)")
    sparsemixer_eps: float = setting(0.01, "sparsemixer (PhiMoE): each pick is weighted among the experts "
                                     "within a relative 2 * eps of its logit")

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
        check_router_options(self)
        check_new_routers(self)
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"router='sparsemixer' picks two experts per token: top_k={self.top_k} must be 2")
        if self.swiglu_limit is not None and (self.activation != "swiglu" or not self.swiglu_limit > 0):
            raise ValueError(f"swiglu_limit={self.swiglu_limit!r} needs activation='swiglu' and must be > 0")

    @property
    def is_token_choice(self) -> bool:
        return self.router in TOKEN_CHOICE_ROUTERS

    @property
    def num_extra_experts(self) -> int:
        """Null and zero-computation experts: routed like experts, computed without a matmul."""
        return self.num_null_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def group_top(self) -> int:
        """How many of a group's best biased scores make its score under ``group_score="sum_top"``."""
        if self.group_score_top is not None:
            return self.group_score_top
        return min(-(-self.top_k // self.topk_group), self.num_experts // self.n_group)

    @property
    def active_k(self) -> int:
        """Assignments per token that capacity is sized for: top_k, times group_top_k for the
        hierarchical router (relu and top_p: top_k as the expected count)."""
        return self.top_k * self.group_top_k if self.router == "hierarchical" else self.top_k

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def shared_hidden_total(self) -> int:
        """Hidden width of the shared MLP: the shared experts' hidden sizes add up."""
        return self.num_shared_experts * (self.shared_d_hidden or self.d_hidden)
