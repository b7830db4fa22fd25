"""The expert-bias steps of aux-loss-free balancing (``sigmoid_bias``), as pure functions.

Legend: T tokens, E experts, K top-k.

``sign`` (DeepSeek-V3) is :func:`moekit.functional.losses.expert_bias_update`; ``sign_centered``
(torchtitan) removes the step's mean so the biases do not drift together; ``quantile`` (quantile
balancing, Su 2026 / Kimi K3) sets each bias to the value at which expert e would be chosen by exactly
a K/E share of the tokens, given every other expert's current threshold.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moekit.functional.losses import expert_bias_update

__all__ = ["BIAS_UPDATES", "bias_step", "centered_sign_bias_update", "quantile_bias_target"]

BIAS_UPDATES = ("sign", "sign_centered", "quantile")


def centered_sign_bias_update(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """bias + u - mean(u), u = rate * sign(mean_load - load_e): the step sums to 0."""
    load_E = tokens_per_expert_E.to(bias_E.dtype)
    u_E = rate * torch.sign(load_E.mean() - load_E)
    return bias_E + (u_E - u_E.mean())


def quantile_bias_target(scores_TE: Tensor, bias_E: Tensor, k: int, mask_T: Tensor | None = None) -> Tensor:
    """The quantile-balancing bias (E,), computed from one batch of router scores s (T, E).

    1. alpha_t = the (k+1)-th largest of s_t + b: the threshold expert e must beat to enter t's top k;
    2. b_e = the k/E quantile over tokens of alpha_t - s_te (linear interpolation): e is then chosen
       (s_te + b_e > alpha_t) by a k/E share of the tokens;
    3. b -= mean(b) (only differences between biases choose experts).
    ``mask_T`` (False = padding): those tokens are left out of the quantile. Detached; float32 or wider.
    """
    T, E = scores_TE.shape
    s_TE = scores_TE.detach().to(torch.promote_types(scores_TE.dtype, torch.float32))
    if T == 0:
        return torch.zeros_like(bias_E)
    alpha_T = (s_TE + bias_E.to(s_TE.dtype)).topk(k + 1, dim=-1).values[:, k]
    gap_TE = alpha_T.unsqueeze(1) - s_TE
    if mask_T is not None:  # NaN rows are ignored by nanquantile: static shapes, no index select
        gap_TE = gap_TE.masked_fill(~mask_T.unsqueeze(1), float("nan"))
    b_E = torch.nanquantile(gap_TE, k / E, dim=0)
    b_E = torch.nan_to_num(b_E, nan=0.0)  # every token padding: no information, keep biases level
    return (b_E - b_E.mean()).to(bias_E.dtype)


def bias_step(kind: str, bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float,
              target_E: Tensor | None = None) -> Tensor:
    """The new bias under ``kind`` (``MoEConfig.bias_update``). ``quantile`` needs ``target_E``, the
    :func:`quantile_bias_target` of the step's scores; the sign steps need only the loads."""
    if kind == "sign":
        return expert_bias_update(bias_E, tokens_per_expert_E, rate)
    if kind == "sign_centered":
        return centered_sign_bias_update(bias_E, tokens_per_expert_E, rate)
    if kind == "quantile":
        if target_E is None:
            raise ValueError("bias_update='quantile' needs the step's bias target (MoEStats.bias_target)")
        return target_E.to(bias_E.dtype).clone()
    raise ValueError(f"bias_update={kind!r} is unknown; choose one of {BIAS_UPDATES}")
