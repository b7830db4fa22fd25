"""Quantize a model's routed experts (and optionally shared experts / attention), save and load it.

A quantized run directory is a run directory (config.json, tokenizer.json, ...) whose model.safetensors
holds, for each quantized weight ``<name>``, the tensors ``<name>_q``, ``<name>_scale`` (and int8's
``<name>_base``) of :mod:`moekit.functional.quant`, and whose ``quantization.json`` records the format.
``RunDir.load_model`` reads it (moekit.rundir.quantized): the model is built on the meta device, the
quantized modules are swapped in, and each stored tensor is assigned as read: nothing is dequantized.

Legend: T tokens, D model dim, E experts, H expert hidden, A assignments.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import QuantSpec
from moekit.functional.dispatch import activation_fn
from moekit.nn.experts import GroupedExperts
from moekit.nn.quantized import QuantizedGroupedExperts, QuantizedLinear, quantized_targets, set_module
from moekit.rundir import QUANT_FILE, RunDir, atomic_copy, atomic_write_json, save_weights

__all__ = ["QuantSpec", "collect_hessians", "coverage", "quantize_model", "save_quantized"]

def _check_divisible(targets: dict[str, nn.Module], spec: QuantSpec) -> None:
    if spec.fmt != "int4":
        return
    for name, m in targets.items():
        dims = ([m.w_up.shape[2], m.w_down.shape[2]] if isinstance(m, GroupedExperts) else [m.in_features])
        for d in dims:
            if d % spec.group:
                raise ValueError(f"--group {spec.group} does not divide the input dim {d} of {name}; "
                                 f"choose a group that divides {d}")


# ---------------------------------------------------------------- calibration (GPTQ Hessians)

class _Recorder(nn.Module):
    """Wraps a GroupedExperts: adds each expert's routing-weighted sum of x x^T (inputs of w_gate/w_up) and
    h h^T (inputs of w_down) into ``hessians``, then computes as the wrapped module does."""

    def __init__(self, inner: GroupedExperts, hessians: dict[str, Tensor]):
        super().__init__()
        self.inner, self.h = inner, hessians

    def forward(self, x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor) -> Tensor:
        m, act = self.inner, activation_fn(self.inner.activation)
        for e in range(m.num_experts):
            sel = expert_A == e
            if not bool(sel.any()):
                continue
            x = x_TD[token_A[sel]].float()
            w = weight_A[sel].float()[:, None]
            self.h["in"][e] += (x * w).t() @ x
            gate = act(x @ m.w_gate[e].t()) * (x @ m.w_up[e].t()) if m.w_gate is not None else act(x @ m.w_up[e].t())
            self.h["hid"][e] += (gate * w).t() @ gate
        return m(x_TD, token_A, expert_A, weight_A)


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Tensor], include: Iterable[str] = ()) -> tuple[dict, int]:
    """(module name -> Hessians, tokens seen): per GroupedExperts {"w_gate"/"w_up": (E, D, D), "w_down": (E, H, H)},
    per included Linear (1, I, I). One pass of the unquantized model over ``batches``."""
    targets = quantized_targets(model, include)
    store: dict[str, dict[str, Tensor]] = {}
    hooks = []
    for name, m in targets.items():
        if isinstance(m, GroupedExperts):
            E, H, D = m.w_up.shape
            store[name] = {"in": torch.zeros(E, D, D), "hid": torch.zeros(E, H, H)}
            set_module(model, name, _Recorder(m, store[name]))
        else:
            store[name] = {"lin": torch.zeros(m.in_features, m.in_features)}

            def hook(mod, args, h=store[name]):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                h["lin"] += x.t() @ x

            hooks.append(m.register_forward_pre_hook(hook))
    tokens = 0
    try:
        for x in batches:
            model(x)
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
        for name, m in targets.items():
            if isinstance(m, GroupedExperts):
                set_module(model, name, m)
    out = {}
    for name, h in store.items():
        out[name] = ({"w_gate": h["in"], "w_up": h["in"], "w_down": h["hid"]} if "in" in h else h["lin"])
    return out, tokens


# ---------------------------------------------------------------- quantize / count

@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, hessians: dict[str, Any] | None = None) -> nn.Module:
    """Swap every GroupedExperts (and the included Linear) for its quantized module, in place; returns model.

    ``hessians`` from :func:`collect_hessians` selects GPTQ; without them weights are rounded to nearest."""
    targets = quantized_targets(model, spec.include)
    _check_divisible(targets, spec)
    for name, m in targets.items():
        h = None if hessians is None else hessians.get(name)
        if isinstance(m, GroupedExperts):
            set_module(model, name, QuantizedGroupedExperts.from_experts(m, spec.fmt, spec.group, h))
        else:
            set_module(model, name, QuantizedLinear.from_linear(m, spec.fmt, spec.group, h))
    model.quant_spec = spec
    return model


def coverage(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per part (routed_experts, shared_experts, attention, other): weights in total and quantized."""
    out = {k: {"total": 0, "quantized": 0} for k in ("routed_experts", "shared_experts", "attention", "other")}
    for name, m in model.named_modules():
        part = ("routed_experts" if isinstance(m, GroupedExperts | QuantizedGroupedExperts)
                else "shared_experts" if ".shared_experts." in name else "attention" if ".attn." in name else "other")
        if isinstance(m, QuantizedGroupedExperts):
            n = sum(E * O * I for k, (E, O, I) in m.shapes.items() if k in m.names)
            out[part]["total"] += n
            out[part]["quantized"] += n
        elif isinstance(m, QuantizedLinear):
            out[part]["total"] += m.in_features * m.out_features
            out[part]["quantized"] += m.in_features * m.out_features
        else:
            out[part]["total"] += sum(p.numel() for p in m.parameters(recurse=False))
    return out


# ---------------------------------------------------------------- run directories

def save_quantized(model: nn.Module, src: RunDir, out: RunDir) -> None:
    """config.json, model.safetensors (quantized tensors), quantization.json, and src's tokenizer."""
    spec: QuantSpec = model.quant_spec
    out.write_config(model.config)
    save_weights(model, out.model_path, metadata={"quantization": spec.fmt})
    if src.tokenizer_path.is_file():
        atomic_copy(src.tokenizer_path, out.tokenizer_path)
    if src.hf_config_path.is_file():
        atomic_copy(src.hf_config_path, out.hf_config_path)
    atomic_write_json(out.path / QUANT_FILE, spec.to_dict())
