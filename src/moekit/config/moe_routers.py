"""Validation of the fields of MoEConfig's dynamic, balanced and hierarchical routers (top_p, relu,
hierarchical, sinkhorn, base, hash, soft), kept apart so ``MoEConfig.__post_init__`` stays short.
Imports nothing of moekit (``moekit.config.moe`` imports this)."""
from __future__ import annotations

from typing import Any

__all__ = ["TOP_P_RULES", "TOP1_ROUTERS", "check_new_routers"]

TOP_P_RULES = ("ge", "gt")
# routers that give each token exactly one expert
TOP1_ROUTERS = ("base", "hash")


def _int_at_least(cfg: Any, name: str, low: int, allow_none: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name}={v!r} must be an integer >= {low}" + (" (or None)" if allow_none else ""))


def check_new_routers(cfg: Any) -> None:
    """Raise ValueError naming the field, its value and the allowed range."""
    E = cfg.num_experts
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p={cfg.top_p!r} must be in (0, 1]")
    if cfg.top_p_rule not in TOP_P_RULES:
        raise ValueError(f"top_p_rule={cfg.top_p_rule!r} is unknown; choose one of {', '.join(TOP_P_RULES)}")
    _int_at_least(cfg, "max_k", 1, allow_none=True)
    if cfg.max_k is not None and cfg.max_k > E:
        raise ValueError(f"max_k={cfg.max_k} must be in [1, num_experts={E}] (or None = num_experts)")
    if not cfg.entropy_loss_coef >= 0:
        raise ValueError(f"entropy_loss_coef={cfg.entropy_loss_coef!r} must be >= 0")
    if not cfg.relu_l1_init > 0:
        raise ValueError(f"relu_l1_init={cfg.relu_l1_init!r} must be > 0")
    if not cfg.relu_l1_multiplier > 1:
        raise ValueError(f"relu_l1_multiplier={cfg.relu_l1_multiplier!r} must be > 1")
    _int_at_least(cfg, "num_expert_groups", 1)
    G = cfg.num_expert_groups
    if E % G:
        raise ValueError(f"num_expert_groups={G} must divide num_experts={E}")
    _int_at_least(cfg, "group_top_k", 1)
    if cfg.group_top_k > G:
        raise ValueError(f"group_top_k={cfg.group_top_k} must be in [1, num_expert_groups={G}]")
    if cfg.router == "hierarchical" and cfg.top_k > E // G:
        raise ValueError(f"top_k={cfg.top_k} (experts per chosen group) must be in [1, num_experts / "
                         f"num_expert_groups={E // G}]")
    _int_at_least(cfg, "sinkhorn_max_iter", 1)
    if not cfg.sinkhorn_tol > 0:
        raise ValueError(f"sinkhorn_tol={cfg.sinkhorn_tol!r} must be > 0")
    if cfg.router in TOP1_ROUTERS and cfg.top_k != 1:
        raise ValueError(f"router={cfg.router!r} routes each token to one expert: top_k={cfg.top_k} must be 1")
    _int_at_least(cfg, "hash_seed", 0)
    _int_at_least(cfg, "hash_vocab_size", 1, allow_none=True)
    _int_at_least(cfg, "slots_per_expert", 1)
