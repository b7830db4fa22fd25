"""MXFP4 (OCP microscaling FP4), the format gpt-oss publishes its experts in: dequantize and quantize.

Legend: R rows, G groups of 32 values per row, C = 32 G columns.

A row of C values is stored as G groups: ``blocks`` (R, G, 16) uint8 hold two FP4 (e2m1) codes per byte,
the low nibble first (even column), and ``scales`` (R, G) uint8 one shared power of two per group,
biased by 127: value = FP4[code] * 2 ** (scale - 127). The checkpoint stores, per expert, the rows of
``gate_up_proj`` (2H, D: gate and up rows interleaved) and of ``down_proj`` (D, H), i.e. nn.Linear's
(out, in) layout, so a dequantized expert is directly moekit's w_gate / w_up rows or its w_down.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FP4_VALUES", "dequantize_mxfp4", "quantize_mxfp4"]

# e2m1 codes 0..15: sign bit, two exponent bits, one mantissa bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_GROUP = 32


# rows per step: the int64 codes and fp32 values of a step stay a few MB, whatever the matrix
_STEP_VALUES = 2**18


def _byte_values(lut: Tensor) -> Tensor:
    """(256, 2): the two FP4 values of each byte, low nibble first."""
    b = torch.arange(256, device=lut.device)
    return torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1)


def _dequantize_rows(blocks_rGb: Tensor, scales_rG: Tensor, pairs: Tensor) -> Tensor:
    """One gather of both values per byte, then one multiply by each group's 2 ** (scale - 127): exact
    (an FP4 value has at most 2 significant bits), so the same bits as ldexp, 4-5x faster on the CPU."""
    r, G, _ = blocks_rGb.shape
    values_rGc = torch.index_select(pairs, 0, blocks_rGb.reshape(-1).to(torch.int32)).view(r, G, _GROUP)
    exp_rG = scales_rG.to(torch.int32) - 127
    if bool((exp_rG > 127).any()):  # 2 ** 128 is not an fp32: scale each value itself
        return torch.ldexp(values_rGc, exp_rG.unsqueeze(-1)).reshape(r, G * _GROUP)
    scale_rG1 = torch.ldexp(torch.ones(r, G, 1, device=values_rGc.device), exp_rG.unsqueeze(-1))
    return values_rGc.mul_(scale_rG1).view(r, G * _GROUP)


def dequantize_mxfp4(blocks_RGb: Tensor, scales_RG: Tensor, dtype: torch.dtype = torch.float32, *,
                     out: Tensor | None = None) -> Tensor:
    """(R, C) values of one matrix's ``blocks`` (R, G, 16) and ``scales`` (R, G), written into ``out``
    when given (any float dtype); a few rows at a time, so nothing but ``out`` is of the matrix's size."""
    if blocks_RGb.dtype != torch.uint8 or scales_RG.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks_RGb.dtype} and {scales_RG.dtype}")
    if tuple(blocks_RGb.shape[:-1]) != tuple(scales_RG.shape) or blocks_RGb.shape[-1] != _GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks_RGb.shape)} do not fit scales {tuple(scales_RG.shape)}")
    R, G, _ = blocks_RGb.shape
    out_RC = torch.empty(R, G * _GROUP, dtype=dtype, device=blocks_RGb.device) if out is None else out
    pairs = _byte_values(torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks_RGb.device))
    step = max(1, _STEP_VALUES // (G * _GROUP))
    for r0 in range(0, R, step):
        out_RC[r0 : r0 + step].copy_(_dequantize_rows(blocks_RGb[r0 : r0 + step], scales_RG[r0 : r0 + step], pairs))
    return out_RC


def _quantize_rows(w_rC: Tensor) -> tuple[Tensor, Tensor]:
    r, C = w_rC.shape
    w_rGc = w_rC.detach().float().reshape(r, C // _GROUP, _GROUP)
    amax_rG = w_rGc.abs().amax(dim=-1)
    exp_rG = torch.ceil(torch.log2(amax_rG / 6.0)).nan_to_num(0.0, neginf=-127.0).clamp(-127, 127)
    scaled_rGc = w_rGc / torch.exp2(exp_rG).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w_rC.device)
    # nearest magnitude (the lower one on a tie), sign in bit 3; -0 stored as +0
    code_rGc = (scaled_rGc.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)
    code_rGc = code_rGc | ((scaled_rGc < 0) & (code_rGc > 0)).to(torch.uint8) << 3
    pairs = code_rGc.reshape(r, C // _GROUP, _GROUP // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), (exp_rG + 127).to(torch.uint8)


def quantize_mxfp4(w_RC: Tensor) -> tuple[Tensor, Tensor]:
    """(blocks (R, G, 16), scales (R, G)) of ``w_RC``: per group of 32 the smallest power of two that
    brings its largest magnitude to <= 6, each value rounded to the nearest FP4 value. Values that are
    already FP4 times a power of two (a dequantized MXFP4 matrix) come back exactly."""
    R, C = w_RC.shape
    if C % _GROUP:
        raise ValueError(f"MXFP4 needs a multiple of {_GROUP} columns, got {C}")
    blocks = torch.empty(R, C // _GROUP, _GROUP // 2, dtype=torch.uint8, device=w_RC.device)
    scales = torch.empty(R, C // _GROUP, dtype=torch.uint8, device=w_RC.device)
    step = max(1, _STEP_VALUES // (8 * C))  # the nearest-value search holds 8 distances per value
    for r0 in range(0, R, step):
        blocks[r0 : r0 + step], scales[r0 : r0 + step] = _quantize_rows(w_RC[r0 : r0 + step])
    return blocks, scales
