"""The one initialisation scheme of moekit's modules: a stand-alone MoELayer, its parts, and every
layer of an MoETransformer follow the same rules."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_weights_"]

# parameters that write into the residual stream: scaled down with depth in a transformer
RESIDUAL_OUT = ("o_proj", "w_down", "down_proj")


@torch.no_grad()
def init_weights_(module: nn.Module, std: float | None = None, out_std: float | None = None) -> None:
    """Initialise every parameter of ``module`` in place, in ``named_parameters`` order.

    | parameter                                        | init                                   |
    |--------------------------------------------------|----------------------------------------|
    | norms (``*norm.weight``)                         | 1                                      |
    | biases (``*.bias``, expert ``*_bias``)           | 0                                      |
    | ``router.w_noise`` (noisy_topk)                  | 0 (the noise starts at softplus(0))    |
    | ``router.soft_scale`` (soft)                     | 1                                      |
    | residual outputs: ``o_proj``, ``w_down``, ``down_proj`` | N(0, out_std)                   |
    | everything else: embeddings, q/k/v, ``w_gate``, ``w_up``, gate/up projections, router, head | N(0, std) |
    | buffer ``router.expert_bias`` (sigmoid_bias)     | 0                                      |

    ``std=None`` gives each matrix N(0, 1/sqrt(fan_in)) (fan_in = its last dim): variance-preserving,
    the default of a stand-alone layer. ``out_std=None`` = ``std``. ``MoETransformer`` passes
    ``std = init_std`` and ``out_std = init_std / sqrt(2 n_layers)``.
    """
    out_std = std if out_std is None else out_std
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith((".bias", "_bias")) or name == "bias":
            nn.init.zeros_(p)
        elif "w_noise" in name:
            nn.init.zeros_(p)
        elif name.endswith("soft_scale"):
            nn.init.ones_(p)
        else:
            s = out_std if any(key in name for key in RESIDUAL_OUT) else std
            nn.init.normal_(p, std=s if s is not None else 1 / math.sqrt(p.shape[-1]))
    for name, b in module.named_buffers():
        if name.endswith("expert_bias"):
            b.zero_()
