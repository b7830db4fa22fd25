"""`moekit bench layer`: the MoE layer against a dense FFN of the same active size, in one process.

Metric: median wall time of ``reps`` timed calls after ``warmup`` untimed ones, forward-only (no_grad)
and forward+backward (backward of a fixed random output gradient, parameter grads cleared between
calls). Repetitions are interleaved round-robin across implementations (rotating order), because a
shared VM's matmul throughput drifts over seconds. GFLOP/s count only the active expert FLOPs:
fwd = 2 * tokens * top_k * 3 * d_model * hidden (SwiGLU), fwd+bwd = 3 * fwd; routing and dispatch are
overhead that lowers the figure. "x dense" is dense time / implementation time (higher is better).
Activation memory = bytes of the tensors autograd saves for backward (parameters excluded).
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.nn.experts import MLP
from moekit.nn.moe import MoELayer

__all__ = ["Shape", "SHAPES", "Impl", "build_impls", "bench_shape", "saved_activation_bytes"]


@dataclass(frozen=True)
class Shape:
    key: str
    name: str
    d_model: int
    hidden: int
    experts: int
    top_k: int
    tokens: int

    @property
    def fwd_flops(self) -> float:
        return 2.0 * self.tokens * self.top_k * 3 * self.d_model * self.hidden


SHAPES = {
    "A": Shape("A", "mixtral-like", 1024, 3584, 8, 2, 2048),
    "B": Shape("B", "fine-grained", 1024, 512, 64, 8, 2048),
    "decode1": Shape("decode1", "shape A, 1 token", 1024, 3584, 8, 2, 1),
    "decode8": Shape("decode8", "shape A, 8 tokens", 1024, 3584, 8, 2, 8),
}
SHAPE_GROUPS = {"A": ["A"], "B": ["B"], "decode": ["decode1", "decode8"], "all": ["A", "B", "decode1", "decode8"]}


@dataclass
class Impl:
    name: str
    module: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""


def _moekit(s: Shape, capacity_factor: float | None, dtype) -> MoELayer:
    cfg = MoEConfig(d_model=s.d_model, d_hidden=s.hidden, num_experts=s.experts, top_k=s.top_k,
                    router="topk", capacity_factor=capacity_factor)
    layer = MoELayer(cfg).to(dtype)
    layer.init_weights(std=0.02)
    return layer


def _hf_block(s: Shape, impl: str, src: MoELayer):
    """transformers' own sparse block on the same weights (Mixtral for 8 experts, Qwen3-MoE otherwise)."""
    warnings.filterwarnings("ignore", message=".*experts_implementation.*")
    if s.experts == 8:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=s.d_model, intermediate_size=s.hidden, num_local_experts=s.experts,
                            num_experts_per_tok=s.top_k, num_hidden_layers=1, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=128, router_jitter_noise=0.0)
        kind = "mixtral"
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Qwen3MoeConfig(hidden_size=s.d_model, moe_intermediate_size=s.hidden, intermediate_size=s.hidden,
                             num_experts=s.experts, num_experts_per_tok=s.top_k, norm_topk_prob=True,
                             num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
        kind = "qwen3moe"
    cfg._experts_implementation = impl
    block = Block(cfg).to(src.router.weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(src.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([src.experts.w_gate, src.experts.w_up], dim=1))
        block.experts.down_proj.copy_(src.experts.w_down)
    return block, f"hf-{kind}-{impl}"


def _compiled(layer: MoELayer, s: Shape, dtype, log: Callable[[str], None] | None) -> Impl | None:
    """``torch.compile`` (inductor, whole graph) of a moekit layer, compiled here for both modes;
    None (with a logged reason) where this machine cannot compile (e.g. no C++ compiler)."""
    compiled = torch.compile(layer, fullgraph=True)
    try:
        x = torch.randn(1, s.tokens, s.d_model, dtype=dtype)
        with torch.no_grad():
            compiled(x)
        compiled(x.requires_grad_(True)).output.sum().backward()
        layer.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 - any compiler failure only drops this row
        if log:
            log(f"  torch.compile unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); row skipped")
        return None
    cap = layer.cfg.capacity_factor
    name = "moekit-dropless-compiled" if cap is None else f"moekit-capacity{cap:g}-compiled"
    return Impl(name, layer, lambda x, m=compiled: m(x).output, "torch.compile(layer, fullgraph=True), inductor")


def build_impls(s: Shape, dtype=torch.float32, with_hf: bool = True, with_compiled: bool = False,
                log: Callable[[str], None] | None = None) -> list[Impl]:
    torch.manual_seed(0)
    dense = MLP(s.d_model, s.top_k * s.hidden, "swiglu").to(dtype)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    dropless = _moekit(s, None, dtype)
    capped = _moekit(s, 1.25, dtype)
    capped.load_state_dict(dropless.state_dict())
    impls = [
        Impl("dense-equivalent", dense, dense, f"SwiGLU MLP, hidden {s.top_k}x{s.hidden}: the lower bound"),
        Impl("moekit-dropless", dropless, lambda x, m=dropless: m(x).output, "softmax top-k, dropless"),
        Impl("moekit-capacity1.25", capped, lambda x, m=capped: m(x).output, "capacity factor 1.25, probs drops"),
    ]
    if with_compiled:
        torch._dynamo.reset()  # each shape compiles afresh: the layers of earlier shapes do not count
        for layer in (dropless, capped):
            twin = _moekit(s, layer.cfg.capacity_factor, dtype)
            twin.load_state_dict(dropless.state_dict())
            im = _compiled(twin, s, dtype, log)
            if im is not None:
                impls.append(im)
    if with_hf:
        try:
            for impl in ("eager", "grouped_mm"):
                block, name = _hf_block(s, impl, dropless)
                impls.append(Impl(name, block, block, f"transformers {impl} experts, same weights"))
        except ImportError:
            pass
    return impls


def saved_activation_bytes(module: nn.Module, fn, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward during ``fn(x)``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr != x.untyped_storage().data_ptr():
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_shape(s: Shape, warmup: int = 2, reps: int = 7, dtype=torch.float32, with_hf: bool = True,
                log: Callable[[str], None] | None = None, with_compiled: bool = False) -> dict:
    """Time every implementation on one shape; returns a dict of per-implementation results."""
    impls = build_impls(s, dtype, with_hf, with_compiled, log)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, s.tokens, s.d_model, generator=gen).to(dtype)
    gy = torch.randn(1, s.tokens, s.d_model, generator=gen).to(dtype)
    xg = x.clone().requires_grad_(True)

    def fwd(im: Impl):
        with torch.no_grad():
            im.fn(x)

    def fwd_bwd(im: Impl):
        for p in im.module.parameters():
            p.grad = None
        xg.grad = None
        im.fn(xg).backward(gy)

    times: dict[str, dict[str, list[float]]] = {im.name: {"fwd": [], "fwd_bwd": []} for im in impls}
    for mode, call in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for r in range(warmup + reps):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for im in order:
                t = _time(lambda: call(im))
                if r >= warmup:
                    times[im.name][mode].append(t)
            if log:
                log(f"  shape {s.key} {mode} round {r + 1}/{warmup + reps}")
        gc.collect()
    out = {"shape": dataclasses.asdict(s), "impls": {}}
    dense_name = impls[0].name
    for im in impls:
        mem = saved_activation_bytes(im.module, im.fn, xg)
        for p in im.module.parameters():
            p.grad = None
        out["impls"][im.name] = {"note": im.note, "saved_activation_bytes": mem}
        for mode in ("fwd", "fwd_bwd"):
            med = statistics.median(times[im.name][mode])
            flops = s.fwd_flops * (3 if mode == "fwd_bwd" else 1)
            out["impls"][im.name][mode] = {"median_s": med, "tokens_per_s": s.tokens / med,
                                           "gflops": flops / med / 1e9, "times_s": times[im.name][mode]}
    dense = out["impls"][dense_name]
    for name, r in out["impls"].items():
        for mode in ("fwd", "fwd_bwd"):
            r[mode]["x_dense"] = dense[mode]["median_s"] / r[mode]["median_s"]
        r["memory_x_dense"] = r["saved_activation_bytes"] / max(1, dense["saved_activation_bytes"])
    return out
