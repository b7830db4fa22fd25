"""Independent block quantizers, written from llama.cpp's ggml-quants.c (quantize_row_q8_0_ref,
quantize_row_q4_0_ref), to hold moekit's formats against: each returns the dequantized weight."""
from __future__ import annotations

import torch
from torch import Tensor, nn

QK = 32  # llama.cpp block size


def q8_0(w: Tensor) -> Tensor:
    """Blocks of 32 along the last dim; d = amax / 127 in fp16; q = round(x / d)."""
    shape = w.shape
    b = w.float().reshape(-1, QK)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.round(b * inv)
    return (q * d).reshape(shape)


def q4_0(w: Tensor) -> Tensor:
    """Blocks of 32; max = the signed value of largest |x|; d = max / -8 in fp16; q = min(15, int(x/d + 8.5))."""
    shape = w.shape
    b = w.float().reshape(-1, QK)
    idx = b.abs().argmax(-1, keepdim=True)
    mx = b.gather(-1, idx)
    d = (mx / -8).half().float()
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.clamp(torch.trunc(b * inv + 8.5), 0, 15)
    return ((q - 8) * d).reshape(shape)


@torch.no_grad()
def apply_reference(model: nn.Module, fn) -> nn.Module:
    """Replace every routed expert weight of ``model`` by ``fn(weight)`` in place (fake quantization)."""
    for layer in model.moe_layers():
        for name in ("w_gate", "w_up", "w_down"):
            p = getattr(layer.experts, name)
            if p is not None:
                p.copy_(fn(p))
    return model
