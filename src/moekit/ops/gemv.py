"""Linear layers of one row (batch-1 decode) as a kernel that streams the weight at memory speed.

A decode step of a large model is a chain of matrix-vector products whose weights do not fit in any
cache, so its speed is how fast the kernel reads them. At one row ``F.linear`` runs MKL's GEMV, which
here streams 13-15 GB/s on one thread and gains nothing from a second (bf16: 5-15 GB/s). Inductor's C++
reduction over ``(w * x).sum(-1)`` reads each weight once, vectorised, its rows split over the OpenMP
threads: 17 GB/s on one thread and 25-28 GB/s on two, fp32 and bf16 alike (measured on a 16 MB and a 400 MB
weight, rotating through more weights than the caches hold). A compiled call costs ~50 us of guards and
wrapper and ~40 us of ours, so only weights of at least ``MIN_BYTES`` take it; smaller ones (every
weight of the default LM) stay on ``F.linear``, and a model without large weights compiles nothing.
:func:`warm_up` compiles at load (``moekit.infer.load.ready_to_decode``), not in the first decode step.

The choice depends only on the input's row count, the weight's size, dtype and layout and whether
autograd records, never on where the weight lives, so a resident model and the same model with its
experts offloaded run the same kernel on the same bits. bf16 products are summed in fp32 and rounded
once. Without a working C++ compiler the first call warns and every later one runs ``F.linear``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MIN_BYTES", "linear", "single_row_kernel", "swiglu_expert", "warm_up"]

# below this a compiled call's fixed cost (~90 us) eats the faster stream: at 2 MiB (the default LM's tied
# head, one thread) the kernel was no faster than F.linear, and compiling would only slow its start
MIN_BYTES = 4 << 20

_DTYPES = (torch.float32, torch.bfloat16)

# inside a compiled graph a reduction has no call cost of its own; below this MKL's GEMV is as fast
TRACED_MIN_BYTES = 0
# a few rows (a batched decode step) over a weight that stays in cache: the traced reduction reads it once a
# row, cheaper than an MKL GEMM call (a 4-row step of the default LM: 2.0 -> 1.4 ms, medians); a weight
# larger than MIN_BYTES would be streamed once a row, so it stays on the GEMM
TRACED_MAX_ROWS = 8


# written in fp32 so a bf16 weight's products are summed in fp32 and rounded once, at the end; inductor
# fuses the casts into the loads, so nothing wider than the weight is ever stored
def _gemv(w_NK: Tensor, x_K: Tensor) -> Tensor:
    return (w_NK.float() * x_K.float()).sum(-1).to(w_NK.dtype)


def _gemv_bias(w_NK: Tensor, x_K: Tensor, b_N: Tensor) -> Tensor:
    return ((w_NK.float() * x_K.float()).sum(-1) + b_N.float()).to(w_NK.dtype)


def _rows_gemv(w_NK: Tensor, x_MK: Tensor, b_N: Tensor | None) -> Tensor:
    y_MN = (w_NK.float() * x_MK.float()[:, None, :]).sum(-1)
    return (y_MN if b_N is None else y_MN + b_N.float()).to(w_NK.dtype)


def _swiglu_expert(x_D: Tensor, w_gate_HD: Tensor, w_up_HD: Tensor, w_down_DH: Tensor,
                   scale: Tensor) -> Tensor:
    x_D = x_D.float()
    h_H = F.silu((w_gate_HD.float() * x_D).sum(-1)) * (w_up_HD.float() * x_D).sum(-1)
    return ((w_down_DH.float() * h_H).sum(-1) * scale.float()).to(w_down_DH.dtype)


_FNS: dict[str, Callable[..., Tensor]] = {"gemv": _gemv, "gemv_bias": _gemv_bias,
                                          "swiglu_expert": _swiglu_expert}


class _Kernels:
    """The compiled kernels, each built at its first use; ``failed`` holds why they could not be."""

    def __init__(self) -> None:
        self.fns: dict[str, Callable[..., Tensor]] = {}
        self.failed: str | None = None

    def get(self, name: str) -> Callable[..., Tensor]:
        fn = self.fns.get(name)
        if fn is None:
            # dynamic shapes: one kernel per dtype serves every size; dynamic threads: the kernel follows
            # torch.set_num_threads at run time instead of the count it was compiled under
            opts: dict[str, Any] = {"cpp.dynamic_threads": True}
            fn = self.fns[name] = torch.compile(_FNS[name], dynamic=True, fullgraph=True, options=opts)
        return fn

    def run(self, name: str, *args: Tensor) -> Tensor | None:
        """The kernel's result, or None (after one warning) once compiling has failed.

        Each call is made in one grad mode with the same kinds of tensors (see :func:`_plain`), so the few
        graphs warmed up by :func:`warm_up` serve every later call: a guard that failed on a tensor's kind
        would compile again mid-decode (seconds)."""
        try:
            with torch.inference_mode(False), torch.no_grad():
                args = tuple(_plain(a) for a in args)
                return self.get(name)(*args)
        except Exception as err:  # noqa: BLE001 - no compiler, or inductor refused: fall back for good
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(f"moekit: the compiled single-row kernels are unavailable ({self.failed}); "
                          "decoding uses F.linear (slower for large weights)", RuntimeWarning, stacklevel=3)
            return None


_KERNELS = _Kernels()


def _plain(t: Tensor) -> Tensor:
    """t as an ordinary tensor outside inference mode: an inference tensor (a model loaded under inference
    mode, a vector made in it) is aliased, without a copy, any other detached (a parameter's sizes would
    compile static), so every kind of weight meets the same compiled graph."""
    if t.is_inference():
        alias = torch.empty(0, dtype=t.dtype)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return t.detach()  # also drops a view's base, which dynamo would guard on


def single_row_kernel(x: Tensor, w: Tensor) -> bool:
    """Whether :func:`linear` takes the compiled kernel for this input and weight."""
    return (x.numel() == x.shape[-1] and w.dim() == 2 and w.shape[1] == x.shape[-1]
            and w.nbytes >= MIN_BYTES and w.dtype in _DTYPES and x.dtype == w.dtype
            and w.device.type == "cpu" and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and _KERNELS.failed is None and not torch.compiler.is_compiling())


@torch.library.custom_op("moekit::stored_row", mutates_args=())
def _stored_row(x_K: Tensor) -> Tensor:
    """A copy of ``x_K`` that a compiled graph must store: inductor would otherwise recompute a cheap
    producer (a norm, a residual add) inside the product's loop, once per weight row (measured on
    OLMoE's 206 MB head: 12.5 ms instead of ~7.5)."""
    return x_K.clone()


@_stored_row.register_fake
def _(x_K: Tensor) -> Tensor:
    return torch.empty_like(x_K)


def _traced_row(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Inside a graph being compiled: one row, no autograd, a weight of at least TRACED_MIN_BYTES."""
    return x.numel() == x.shape[-1] and w.nbytes >= TRACED_MIN_BYTES and _traceable(x, w, b)


def _traced_rows(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Inside a graph being compiled: 2..TRACED_MAX_ROWS rows over a weight below MIN_BYTES."""
    return x.shape[-1] < x.numel() <= TRACED_MAX_ROWS * x.shape[-1] and w.nbytes < MIN_BYTES and _traceable(x, w, b)


def _traceable(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    return (w.dim() == 2 and w.shape[1] == x.shape[-1] and w.dtype in _DTYPES and x.dtype == w.dtype
            and (b is None or b.dtype == w.dtype) and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def linear(x: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """``F.linear(x, w_NK, b_N)``; when x holds one row (``x.numel() == K``) and the weight is large, the
    compiled streaming kernel (same result to fp32 rounding: the sum runs in another order). Inside a graph
    being compiled (a compiled decode step), a one-row product is that kernel's reduction traced inline, and
    so are a few rows over a small weight."""
    if torch.compiler.is_compiling():
        if _traced_row(x, w_NK, b_N):
            x_K = x.reshape(-1) if w_NK.nbytes < MIN_BYTES else torch.ops.moekit.stored_row(x.reshape(-1))
            y_N = _gemv(w_NK, x_K) if b_N is None else _gemv_bias(w_NK, x_K, b_N)
            return y_N.reshape(*x.shape[:-1], w_NK.shape[0])
        if _traced_rows(x, w_NK, b_N):
            return _rows_gemv(w_NK, x.reshape(-1, x.shape[-1]), b_N).reshape(*x.shape[:-1], w_NK.shape[0])
        return F.linear(x, w_NK, b_N)
    if single_row_kernel(x, w_NK) and (b_N is None or b_N.dtype == w_NK.dtype):
        x_K = x.reshape(-1)
        y_N = (_KERNELS.run("gemv", w_NK, x_K) if b_N is None
               else _KERNELS.run("gemv_bias", w_NK, x_K, b_N))
        if y_N is not None:
            return y_N.reshape(*x.shape[:-1], w_NK.shape[0])
    return F.linear(x, w_NK, b_N)


def swiglu_expert(x_1D: Tensor, w_gate_HD: Tensor, w_up_HD: Tensor, w_down_DH: Tensor,
                  scale: Tensor) -> Tensor | None:
    """``scale * w_down @ (silu(w_gate @ x) * (w_up @ x))`` for one row, (1, D), as one compiled call (three
    streaming reductions, the elementwise steps in fp32 between them), or None when the kernel does not
    apply (see :func:`single_row_kernel`) and the caller runs its own ops. scale: one element."""
    H, D = w_up_HD.shape
    if not (single_row_kernel(x_1D, w_up_HD) and w_gate_HD.shape == w_up_HD.shape
            and w_down_DH.shape == (D, H) and w_gate_HD.dtype == w_down_DH.dtype == w_up_HD.dtype
            and w_gate_HD.is_contiguous() and w_down_DH.is_contiguous()):
        return None  # (a shape error inside the compiled call would read as "no compiler")
    y_D = _KERNELS.run("swiglu_expert", x_1D.reshape(-1), w_gate_HD, w_up_HD, w_down_DH,
                       scale.reshape(()).float())
    return None if y_D is None else y_D.reshape(x_1D.shape)


def warm_up(tensors: Iterable[Tensor],
            experts: Iterable[tuple[int, int, torch.dtype]] = ()) -> list[torch.dtype]:
    """Compile now, not in the first decode step, the kernels that one-row products over ``tensors`` will
    take: a large 2-D weight is read once through :func:`linear` (and its bias kernel, when a 1-D tensor of
    its row count is among ``tensors``); a 3-D stack of experts (E, H, D), and each ``(H, D, dtype)`` of
    ``experts`` (routed experts kept elsewhere, e.g. on disk), is stood in for by zero matrices of its
    shapes, an expert at offset 0 of its stack and one past it. Real shapes matter: inductor guards its
    loop choices on size ranges, and a graph compiled for other sizes would compile again mid-decode.
    Returns the dtypes compiled for (none: no weight is large enough)."""
    tensors = [t for t in tensors if t.dtype in _DTYPES and t.device.type == "cpu"]
    lengths = {t.numel() for t in tensors if t.dim() == 1}
    matrices = [t for t in tensors if t.dim() == 2 and t.nbytes >= MIN_BYTES and t.is_contiguous()]
    stacks = {(t.shape[1], t.shape[2], t.dtype) for t in tensors
              if t.dim() == 3 and t[0].nbytes >= MIN_BYTES}
    stacks |= {(H, D, dt) for H, D, dt in experts if dt in _DTYPES and H * D * dt.itemsize >= MIN_BYTES}
    with torch.inference_mode():  # as decoding runs
        for w in matrices:
            x = torch.zeros(1, w.shape[1], dtype=w.dtype)
            linear(x, w)
            if w.shape[0] in lengths:
                linear(x, w, torch.zeros(w.shape[0], dtype=w.dtype))
        for H, D, dt in sorted(stacks, key=str):
            with torch.inference_mode(False):  # plain tensors, as parameters are
                gate, up, down = (torch.zeros(2, *shape, dtype=dt) for shape in ((H, D), (H, D), (D, H)))
            x_D, x_H = torch.zeros(1, D, dtype=dt), torch.zeros(1, H, dtype=dt)
            for e in (0, 1):
                swiglu_expert(x_D, gate[e], up[e], down[e], torch.ones(1))
                linear(x_D, up[e])  # experts of another activation: one product at a time
                linear(x_H, down[e])
    return sorted({w.dtype for w in matrices} | {dt for _, _, dt in stacks}, key=str)
