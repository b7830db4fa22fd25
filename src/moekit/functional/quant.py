"""Weight-only quantization formats of fused (E, out, in) tensors: pure tensor maths, no nn.Module.

Legend: E experts (1 for a plain Linear), O output rows, I inputs, G inputs per group, N groups = I / G.

Two formats (``QTensor.fmt``):

``int8``   q_EOI int8 in [-127, 127]; one scale per (expert, row), stored as a uint8 log code
           ``code_EO`` against an fp32 per-expert base ``base_E``:  scale = base * 2^(-code / 32).
           The code is rounded so the scale is never below absmax / 127 (no clipping); a row is then
           quantized at most 2.2 % coarser than with an exact scale. An fp16 scale per row would cost
           16 / I bits per weight (8.104 bits at the default LM's I = 128 / 256 mix); the code costs 8 / I.
``int4``   symmetric, q in [-8, 7], two nibbles per uint8 along I (``q_EOP``, P = I / 2: low nibble =
           even input, high nibble = odd input, each stored as q + 8); one fp16 scale per group of G
           inputs (``scale_EON``, signed like llama.cpp's Q4_0 so the largest-magnitude value can use -8).
           Bits per weight: 4 + 16 / G (4.5 at G = 32). No zero point: a zero point would cost another
           16 / G bits, and trained FFN weights are near-symmetric.

Rounding: round-to-nearest against scales fixed per row / group from the weights, or GPTQ (Frantar et al. 2022) when a Hessian
X^T X of the calibration inputs is given: columns are quantized in order and each one's error is
spread over the columns not yet quantized.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config.quant import FORMATS

__all__ = ["FORMATS", "QTensor", "bits_per_weight", "decode_int8_scale", "dequantize", "gptq", "pack_int4", "quantize", "unpack_int4"]

_CODE_STEPS = 32.0  # int8 scale codes per octave


@dataclass
class QTensor:
    """A quantized (E, O, I) tensor: the stored tensors (``tensors()``) and how to read them back."""

    fmt: str
    shape: tuple[int, int, int]
    q: Tensor  # int8: (E, O, I) int8; int4: (E, O, I/2) uint8
    scale: Tensor  # int8: code (E, O) uint8; int4: (E, O, N) fp16
    base: Tensor | None = None  # int8: (E,) fp32
    group: int | None = None

    def tensors(self) -> dict[str, Tensor]:
        out = {"q": self.q, "scale": self.scale}
        if self.base is not None:
            out["base"] = self.base
        return out


def bits_per_weight(fmt: str, in_features: int, group: int | None = None, rows_per_expert: int | None = None) -> float:
    """Stored bits per weight, scales included (int8 also counts its per-expert base over O rows)."""
    if fmt == "int8":
        return 8 + 8 / in_features + (32 / (in_features * rows_per_expert) if rows_per_expert else 0)
    return 4 + 16 / group


def pack_int4(q_EOI: Tensor) -> Tensor:
    """int values in [-8, 7] -> uint8 (E, O, I/2): low nibble even input, high nibble odd input."""
    u = (q_EOI.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p_EOP: Tensor) -> Tensor:
    """uint8 (..., P) -> int8 (..., 2P) in [-8, 7]."""
    lo = (p_EOP & 15).to(torch.int8) - 8
    hi = (p_EOP >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _int8_scales(w_EOI: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(code_EO uint8, base_E fp32, scale_EO fp32 as decoded): scale >= absmax / 127 per row."""
    need_EO = w_EOI.abs().amax(-1).float() / 127
    base_E = need_EO.amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    # code = floor(-32 log2(need / base)) keeps base * 2^(-code/32) >= need; a row of zeros gets code 255
    ratio = (need_EO / base_E[:, None]).clamp_min(2.0 ** (-255 / _CODE_STEPS))
    code_EO = torch.floor(-_CODE_STEPS * torch.log2(ratio)).clamp(0, 255)
    scale_EO = decode_int8_scale(code_EO, base_E)
    # log2 rounding can land one code too far; step back wherever the decoded scale is short
    short = scale_EO < need_EO
    code_EO = torch.where(short, code_EO - 1, code_EO).clamp(0, 255)
    code_EO = code_EO.to(torch.uint8)
    return code_EO, base_E, decode_int8_scale(code_EO, base_E)


@functools.cache
def _code_steps() -> Tensor:
    """2^(-code / 32) for the 256 codes, computed once."""
    return torch.exp2(-torch.arange(256, dtype=torch.float32) / _CODE_STEPS)


def decode_int8_scale(code_EO: Tensor, base_E: Tensor) -> Tensor:
    """(E, O) fp32 scales of int8 codes: base * 2^(-code / 32). A table lookup, not exp2 of the codes:
    aten's exp2 takes a vector path or a scalar one (1 ulp apart) by an element's place in the tensor,
    so decoding one expert's rows must not give other bits than decoding all of them (the expert cache
    decodes experts one at a time)."""
    return base_E[:, None] * _code_steps().to(code_EO.device)[code_EO.long()]


def _int4_scales(w_EOI: Tensor, group: int) -> Tensor:
    """fp16 (E, O, N): per group, its largest-magnitude value (with its sign) / -8, so that value is -8 exactly.

    Smaller, clipping scales (0.76-0.97 of it) lower each group's squared error but were measured to raise
    the default LM's KL by 1.2-1.5x (with and without GPTQ): the clipped outliers matter more than the rest."""
    E, O, I = w_EOI.shape
    w_EONG = w_EOI.float().reshape(E, O, I // group, group)
    idx = w_EONG.abs().argmax(-1, keepdim=True)
    return (w_EONG.gather(-1, idx).squeeze(-1) / -8).half()


def _col_scale(fmt: str, scale: Tensor, group: int | None, i: int) -> Tensor:
    """(E, O) fp32 scale of input column i."""
    return scale if fmt == "int8" else scale[:, :, i // group].float()


def _round(fmt: str, w: Tensor, s: Tensor) -> Tensor:
    lo, hi = (-127, 127) if fmt == "int8" else (-8, 7)
    return torch.clamp(torch.round(w / torch.where(s == 0, 1.0, s)), lo, hi)


def gptq(w_EOI: Tensor, h_EII: Tensor, fmt: str, scale: Tensor, group: int | None, damp: float = 0.01) -> Tensor:
    """Integer codes (E, O, I) fp32 by GPTQ: column i is rounded, and its error over the inverse Hessian's
    Cholesky factor U is subtracted from columns > i:  W[:, j] -= (w_i - q_i) / U_ii * U_ij.

    ``h_EII`` = sum of x x^T over calibration inputs; ``damp`` * mean diagonal is added (inputs that never
    fire get a unit diagonal, so their columns are plainly rounded)."""
    I = w_EOI.shape[-1]
    W = w_EOI.double().clone()
    H = h_EII.double().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (E, I, I)
    Q = torch.empty_like(W)
    for i in range(I):
        s = _col_scale(fmt, scale, group, i).double()
        w = W[:, :, i]
        q = _round(fmt, w, s)
        Q[:, :, i] = q
        err = (w - q * s) / U[:, i, i][:, None]
        W[:, :, i + 1:] -= err[:, :, None] * U[:, i, i + 1:][:, None, :]
    return Q.float()


def quantize(w_EOI: Tensor, fmt: str, group: int | None = None, hessian_EII: Tensor | None = None) -> QTensor:
    """Quantize a (E, O, I) weight (a 2-D (O, I) weight is treated as E = 1); GPTQ when a Hessian is given."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    w = w_EOI.detach().float()
    if w.dim() == 2:
        w = w.unsqueeze(0)
    E, O, I = w.shape
    if fmt == "int4":
        if group is None or group < 2 or group % 2 or I % group:
            raise ValueError(f"group={group} must be an even divisor of the input dim {I} for int4")
        s_EON = _int4_scales(w, group)
        s_full = s_EON.float()
        if hessian_EII is not None:
            q = gptq(w, hessian_EII, fmt, s_full, group)
        else:
            q = _round(fmt, w.reshape(E, O, I // group, group), s_full[..., None]).reshape(E, O, I)
        return QTensor(fmt, (E, O, I), pack_int4(q.to(torch.int8)), s_EON, group=group)
    code, base, s_EO = _int8_scales(w)
    q = gptq(w, hessian_EII, fmt, s_EO, None) if hessian_EII is not None else _round(fmt, w, s_EO[..., None])
    return QTensor(fmt, (E, O, I), q.to(torch.int8), code, base=base)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32, expert: int | None = None) -> Tensor:
    """The (E, O, I) weight, or only expert ``expert``'s (O, I): what the compute reads."""
    sl = slice(None) if expert is None else slice(expert, expert + 1)
    if qt.fmt == "int8":
        s = decode_int8_scale(qt.scale[sl], qt.base[sl]).to(dtype)
        w = qt.q[sl].to(dtype) * s[..., None]
    else:
        q = unpack_int4(qt.q[sl])
        E, O, I = q.shape
        w = (q.to(dtype).view(E, O, I // qt.group, qt.group) * qt.scale[sl].to(dtype)[..., None]).view(E, O, I)
    return w if expert is None else w[0]
