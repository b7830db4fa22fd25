"""Validation of the options on MoEConfig's existing routers (group score, bias update, null and
zero-computation experts, device and communication losses), kept apart so ``MoEConfig.__post_init__``
stays short. Imports nothing of moekit (``moekit.config.moe`` imports this)."""
from __future__ import annotations

from typing import Any

__all__ = ["EXTRA_EXPERT_FIELDS", "FIXED_K_ROUTERS", "check_router_options"]

# field -> the kind its experts are counted under in the statistics, in expert-id order after the E
# routed experts
EXTRA_EXPERT_FIELDS = (
    ("num_null_experts", "null"),
    ("num_zero_experts", "zero"),
    ("num_copy_experts", "copy"),
    ("num_constant_experts", "constant"),
)


# token-choice routers that give every token exactly top_k picks (the device losses count them)
FIXED_K_ROUTERS = ("topk", "switch", "noisy_topk", "sigmoid_bias")


def _count(cfg: Any, name: str) -> int:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name}={v!r} must be an integer >= 0")
    return v


def check_router_options(cfg: Any) -> None:
    """Raise ValueError naming the field, its value and the allowed range."""
    group_size = cfg.num_experts // cfg.n_group
    top = cfg.group_score_top
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= group_size):
        raise ValueError(f"group_score_top={top!r} must be in [1, num_experts / n_group={group_size}] "
                         "(or None = ceil(top_k / topk_group))")
    extra = sum(_count(cfg, name) for name, _ in EXTRA_EXPERT_FIELDS)
    if extra and cfg.router != "topk":
        raise ValueError(f"null / zero-computation experts ({extra}) need router='topk', not {cfg.router!r}")
    if cfg.bias_update == "quantile" and cfg.top_k >= cfg.num_experts:
        raise ValueError(f"bias_update='quantile' needs the (top_k + 1)-th best score: top_k={cfg.top_k} must "
                         f"be < num_experts={cfg.num_experts}")
    if cfg.balance_scope == "global" and (cfg.router not in FIXED_K_ROUTERS or cfg.seq_aux):
        raise ValueError(f"balance_scope='global' needs the batch-level balance loss of a fixed top-k router, one "
                         f"of {FIXED_K_ROUTERS} without seq_aux; router={cfg.router!r}, seq_aux={cfg.seq_aux}")
    d = cfg.num_devices
    if not isinstance(d, int) or isinstance(d, bool) or d < 1 or cfg.num_experts % d:
        raise ValueError(f"num_devices={d!r} must be an integer >= 1 dividing num_experts={cfg.num_experts}")
    if d > 1 and cfg.router not in FIXED_K_ROUTERS:
        raise ValueError(f"num_devices={d}: the device and communication losses need a fixed top-k router, one of "
                         f"{FIXED_K_ROUTERS}, not router={cfg.router!r}")
    for name in ("device_loss_coef", "comm_loss_coef"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be >= 0")
    if cfg.comm_loss_coef and cfg.topk_group > d:
        raise ValueError(f"comm_loss_coef: M = topk_group={cfg.topk_group} devices per token must be <= "
                         f"num_devices={d}")
