"""Quantized modules swapped into a built model: QuantizedGroupedExperts (for GroupedExperts) and
QuantizedLinear (for shared experts / attention with ``include``). Each dequantizes one expert's weights
at a time, only for the experts a call routes to, so the whole model is never dequantized.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, n assignments of one expert.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import QuantSpec
from moekit.functional.dispatch import activation_fn
from moekit.functional.quant import QTensor, decode_int8_scale, dequantize, quantize, unpack_int4
from moekit.nn.experts import GroupedExperts

__all__ = ["QuantizedGroupedExperts", "QuantizedLinear", "quantized_shapes", "quantized_targets", "set_module",
           "swap_in_quantized"]

PROJ = ("w_gate", "w_up", "w_down")


def _register(module: nn.Module, name: str, qt: QTensor) -> None:
    for part, t in qt.tensors().items():
        module.register_buffer(f"{name}_{part}", t.contiguous())


def _qtensor(module: nn.Module, name: str, fmt: str, shape: tuple[int, int, int], group: int | None) -> QTensor:
    base = getattr(module, f"{name}_base", None)
    return QTensor(fmt, shape, getattr(module, f"{name}_q"), getattr(module, f"{name}_scale"), base, group)


def quantized_shapes(fmt: str, E: int, O: int, I: int, group: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names (suffixes), shapes and dtypes of the stored tensors of one quantized (E, O, I) weight."""
    if fmt == "int8":
        return {"q": ((E, O, I), torch.int8), "scale": ((E, O), torch.uint8), "base": ((E,), torch.float32)}
    return {"q": ((E, O, I // 2), torch.uint8), "scale": ((E, O, I // group), torch.float16)}


class QuantizedGroupedExperts(nn.Module):
    """Same call as :class:`moekit.nn.experts.GroupedExperts` (``forward(x_TD, token_A, expert_A, weight_A)``,
    expert id E = dropped), over weights stored in a :mod:`moekit.functional.quant` format.

    1. sort the assignments by expert (dropped ones, id E, sort last and are not computed);
    2. per expert with rows: dequantize its three (H, D) / (D, H) slices to the input dtype, run the FFN;
    3. weight each row by its combine weight and scatter-add into the token's output.
    """

    def __init__(self, fmt: str, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu",
                 group: int | None = None, qtensors: dict[str, QTensor] | None = None):
        super().__init__()
        self.fmt, self.group, self.activation = fmt, group, activation
        E, D, H = num_experts, d_model, d_hidden
        self.shapes = {"w_gate": (E, H, D), "w_up": (E, H, D), "w_down": (E, D, H)}
        self.names = [n for n in PROJ if activation == "swiglu" or n != "w_gate"]
        for name in self.names:
            if qtensors is not None:
                _register(self, name, qtensors[name])
            else:  # empty buffers of the stored shapes (filled by load_state_dict)
                for part, (shape, dtype) in quantized_shapes(fmt, *self.shapes[name], group).items():
                    self.register_buffer(f"{name}_{part}", torch.empty(shape, dtype=dtype))

    @classmethod
    def from_experts(cls, experts: nn.Module, fmt: str, group: int | None = None,
                     hessians: dict[str, Tensor] | None = None) -> QuantizedGroupedExperts:
        """Quantize a GroupedExperts (``hessians``: projection name -> (E, I, I) for GPTQ, else rounding)."""
        E, H, D = experts.w_up.shape
        qts = {n: quantize(getattr(experts, n), fmt, group, None if hessians is None else hessians.get(n))
               for n in PROJ if getattr(experts, n, None) is not None}
        return cls(fmt, E, D, H, experts.activation, group, qts)

    @property
    def num_experts(self) -> int:
        return self.shapes["w_up"][0]

    def weight(self, name: str, expert: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Expert ``expert``'s dequantized (O, I) slice of projection ``name``."""
        return dequantize(_qtensor(self, name, self.fmt, self.shapes[name], self.group), dtype, expert)

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole (E, O, I) projection (for tests and reports; the forward never calls it)."""
        return dequantize(_qtensor(self, name, self.fmt, self.shapes[name], self.group), dtype)

    def _scales(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Decoded scales per projection, kept after the first call: int8 (E, O), int4 (E, O, N, 1). They are
        1/I of the weights' elements (a row's fp32 scale is 4 bytes beside its I int8 weights)."""
        key = (dtype, self.fmt)
        cache = self.__dict__.get("_scale_cache")
        if cache is None or cache[0] != key or next(iter(cache[1].values())).device != self.w_up_q.device:
            out = {}
            for n in self.names:
                if self.fmt == "int8":
                    out[n] = decode_int8_scale(getattr(self, f"{n}_scale"), getattr(self, f"{n}_base")).to(dtype)
                else:
                    out[n] = getattr(self, f"{n}_scale").to(dtype)[..., None]
            cache = (key, out)
            self.__dict__["_scale_cache"] = cache
        return cache[1]

    def _linear(self, x_nI: Tensor, name: str, e: int, s: Tensor) -> Tensor:
        """x @ W_e^T for one expert: int8 scales the output rows (y = (x @ q^T) * s, one pass less over W);
        int4 unpacks both nibbles, then scales each group."""
        q = getattr(self, f"{name}_q")[e]
        if self.fmt == "int8":
            if x_nI.dtype == torch.bfloat16 and x_nI.device.type == "cpu":
                # aten's weight-only int8 matmul: 5 us against 38 us for dequantizing at (1, 128) x (256, 128) bf16
                # here; with fp32 activations it is 3x slower than dequantizing (41 vs 14 us), so fp32 keeps that
                return torch._weight_int8pack_mm(x_nI.contiguous(), q, s[e])
            return F.linear(x_nI, q.to(x_nI.dtype)) * s[e]
        O, P = q.shape
        w = unpack_int4(q).to(x_nI.dtype)  # (O, I); a 256-entry table lookup measured 1.6x slower here
        return F.linear(x_nI, (w.view(O, -1, self.group) * s[e]).view(O, 2 * P))

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        E, dt = self.num_experts, x_TD.dtype
        act = activation_fn(self.activation)
        sc = self._scales(dt)
        gated = "w_gate" in self.names
        # 1. sort by expert; counts per expert (dropped assignments, id E, are the tail)
        order_A = torch.argsort(expert_A, stable=True)
        counts = torch.bincount(expert_A, minlength=E + 1)[:E].tolist()
        kept = sum(counts)
        tok_A = token_A[order_A[:kept]]
        w_A = weight_A[order_A[:kept]].to(dt)
        x_AD = x_TD.index_select(0, tok_A)
        y_AD = torch.empty_like(x_AD)
        start = 0
        # 2. one expert at a time, dequantizing only its slices
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x_nD = x_AD[start:start + n]
            up = self._linear(x_nD, "w_up", e, sc["w_up"])
            h_nH = act(self._linear(x_nD, "w_gate", e, sc["w_gate"])) * up if gated else act(up)
            y_AD[start:start + n] = self._linear(h_nH, "w_down", e, sc["w_down"])
            start += n
        # 3. combine
        return torch.zeros_like(x_TD).index_add_(0, tok_A, y_AD * w_A[:, None])

    def extra_repr(self) -> str:
        E, H, D = self.shapes["w_up"]
        g = f", group={self.group}" if self.group else ""
        return f"fmt={self.fmt!r}{g}, num_experts={E}, d_model={D}, d_hidden={H}, activation={self.activation!r}"


class QuantizedLinear(nn.Module):
    """A bias-free or biased nn.Linear whose weight is stored quantized (E = 1); the bias stays as it was."""

    def __init__(self, fmt: str, in_features: int, out_features: int, group: int | None = None,
                 bias: Tensor | None = None, has_bias: bool = False, qtensor: QTensor | None = None):
        super().__init__()
        self.fmt, self.group = fmt, group
        self.in_features, self.out_features = in_features, out_features
        self.shape = (1, out_features, in_features)
        if qtensor is not None:
            _register(self, "weight", qtensor)
        else:
            for part, (shape, dtype) in quantized_shapes(fmt, *self.shape, group).items():
                self.register_buffer(f"weight_{part}", torch.empty(shape, dtype=dtype))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else (
            nn.Parameter(torch.empty(out_features)) if has_bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group: int | None = None,
                    hessian: Tensor | None = None) -> QuantizedLinear:
        qt = quantize(linear.weight, fmt, group, None if hessian is None else hessian.unsqueeze(0))
        return cls(fmt, linear.in_features, linear.out_features, group, linear.bias, qtensor=qt)

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize(_qtensor(self, "weight", self.fmt, self.shape, self.group), x.dtype, 0)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"fmt={self.fmt!r}, in_features={self.in_features}, out_features={self.out_features}"


def quantized_targets(model: nn.Module, include: Iterable[str]) -> dict[str, nn.Module]:
    """qualified name -> module to quantize: every GroupedExperts, plus the included nn.Linear."""
    include = set(include)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts) or isinstance(m, nn.Linear) and (("shared" in include and ".shared_experts." in name)
                                           or ("attention" in include and ".attn." in name)):
            out[name] = m
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_in_quantized(model: nn.Module, spec: QuantSpec) -> None:
    """Swap meta-device placeholders of the quantized modules into a meta model."""
    for name, m in quantized_targets(model, spec.include).items():
        if isinstance(m, GroupedExperts):
            E, H, D = m.w_up.shape
            set_module(model, name, QuantizedGroupedExperts(spec.fmt, E, D, H, m.activation, spec.group))
        else:
            set_module(model, name, QuantizedLinear(spec.fmt, m.in_features, m.out_features, spec.group,
                                              has_bias=m.bias is not None))
