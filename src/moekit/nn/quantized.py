"""Quantized modules swapped into a built model: QuantizedGroupedExperts (for GroupedExperts) and
QuantizedLinear (for shared experts / attention with ``include``). Each dequantizes one expert's weights
at a time, only for the experts a call routes to, so the whole model is never dequantized.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments, n assignments of one expert.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import QuantSpec
from moekit.functional.dispatch import activation_fn
from moekit.functional.quant import QTensor, decode_int8_scale, dequantize, quantize
from moekit.nn.experts import GroupedExperts

__all__ = ["QuantizedGroupedExperts", "QuantizedLinear", "SortedAssignments", "expert_ffn", "expert_linear",
           "expert_scales", "quantized_shapes", "quantized_targets", "set_module", "sort_assignments",
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


def expert_scales(fmt: str, scale: Tensor, base: Tensor | None, dtype: torch.dtype) -> Tensor:
    """What the compute multiplies by, from the stored scales of E experts: int8 codes (E, O) with their
    bases (E,) -> (E, O) in ``dtype``; int4 (E, O, N) fp16 -> (E, O, N, 1) in ``dtype``. Element-wise, so
    one expert's slice decodes to the same bits as the whole tensor."""
    if fmt == "int8":
        return decode_int8_scale(scale, base).to(dtype)
    return scale.to(dtype)[..., None]


def expert_linear(x_nI: Tensor, q: Tensor, s: Tensor, fmt: str, group: int | None, buf: Tensor | None = None) -> Tensor:
    """x @ W^T for one expert's stored (O, I) int8 / (O, I/2) packed int4 weight and its :func:`expert_scales`
    slice. int8 scales the output rows (y = (x @ q^T) * s, one pass less over W); int4 dequantizes (its
    products nibble * scale are exact in fp32) and multiplies. ``buf``: a reusable buffer of >= O * I
    elements of x's dtype for int4's dequantized weight; the bits are the same with or without it.

    Measured here, 1 thread, (1, I) x (O, I): int4 writing the nibbles in place took 33 us against 49 us for
    unpack_int4's stack + flatten at (256, 128), 2.0 ms (with ``buf``) against 2.4 ms at (1024, 2048); a
    256-entry table was slower still. For int8 a reusable buffer was no faster than ``q.to`` (13 vs 10 us,
    734 vs 702 us), so int8 does not use it."""
    if fmt == "int8":
        if x_nI.dtype == torch.bfloat16 and x_nI.device.type == "cpu":
            # aten's weight-only int8 matmul: 5 us against 38 us for dequantizing at (1, 128) x (256, 128) bf16
            # here; with fp32 activations it is 3x slower than dequantizing (41 vs 14 us), so fp32 keeps that
            return torch._weight_int8pack_mm(x_nI.contiguous(), q, s)
        return F.linear(x_nI, q.to(x_nI.dtype)) * s
    O, P = q.shape
    w_OP2 = (x_nI.new_empty(O * P * 2) if buf is None else buf[:O * P * 2]).view(O, P, 2)
    w_OP2[..., 0].copy_(q & 15)  # low nibble = even input
    w_OP2[..., 1].copy_(q >> 4)
    w_OI = w_OP2.view(O, 2 * P).sub_(8)
    w_OI.view(O, -1, group).mul_(s)
    return F.linear(x_nI, w_OI)


def expert_ffn(x_nD: Tensor, weights, fmt: str, group: int | None, activation: str, buf: Tensor | None = None) -> Tensor:
    """One expert's FFN on its n rows; ``weights(name) -> (q, s)`` gives its stored weight and scales."""
    act = activation_fn(activation)
    up = expert_linear(x_nD, *weights("w_up"), fmt, group, buf)
    h_nH = act(expert_linear(x_nD, *weights("w_gate"), fmt, group, buf)) * up if activation == "swiglu" else act(up)
    return expert_linear(h_nH, *weights("w_down"), fmt, group, buf)


@dataclass
class SortedAssignments:
    """The kept assignments sorted by expert (dropped ones, id E, sort last and are left out): the rows
    ``x_AD``, their tokens and combine weights, and the per-expert ``counts``."""

    x_AD: Tensor
    tok_A: Tensor
    w_A: Tensor
    counts: list[int]

    def runs(self) -> Iterator[tuple[int, slice]]:
        """(expert, its rows) for every expert with rows, in expert order."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, slice(start, start + n)
                start += n

    def combine(self, x_TD: Tensor, y_AD: Tensor) -> Tensor:
        """Weight each row by its combine weight and scatter-add it into its token's output."""
        return torch.zeros_like(x_TD).index_add_(0, self.tok_A, y_AD * self.w_A[:, None])


def sort_assignments(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, E: int) -> SortedAssignments:
    order_A = torch.argsort(expert_A, stable=True)
    counts = torch.bincount(expert_A, minlength=E + 1)[:E].tolist()
    kept = order_A[:sum(counts)]
    tok_A = token_A[kept]
    return SortedAssignments(x_TD.index_select(0, tok_A), tok_A, weight_A[kept].to(x_TD.dtype), counts)


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
        """Decoded scales per projection (:func:`expert_scales` of all experts), kept after the first call.
        They are 1/I of the weights' elements (a row's fp32 scale is 4 bytes beside its I int8 weights)."""
        key = (dtype, self.fmt)
        cache = self.__dict__.get("_scale_cache")
        if cache is None or cache[0] != key or next(iter(cache[1].values())).device != self.w_up_q.device:
            out = {n: expert_scales(self.fmt, getattr(self, f"{n}_scale"), getattr(self, f"{n}_base", None), dtype)
                   for n in self.names}
            cache = (key, out)
            self.__dict__["_scale_cache"] = cache
        return cache[1]

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        sc = self._scales(x_TD.dtype)
        plan = sort_assignments(x_TD, token_A, expert_A, weight_A, self.num_experts)
        y_AD = torch.empty_like(plan.x_AD)
        buf = x_TD.new_empty(max(O * I for _, O, I in self.shapes.values())) if self.fmt == "int4" else None
        for e, sl in plan.runs():  # one expert at a time, dequantizing only its slices
            y_AD[sl] = expert_ffn(plan.x_AD[sl], lambda n, e=e: (getattr(self, f"{n}_q")[e], sc[n][e]),
                                  self.fmt, self.group, self.activation, buf)
        return plan.combine(x_TD, y_AD)

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
