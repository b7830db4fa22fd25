"""Reading a quantized run directory: the model is built on the meta device, the quantized modules are
swapped in, and each stored tensor is assigned as read (nothing is dequantized)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from moekit.config import QuantSpec
from moekit.nn.quantized import swap_in_quantized
from moekit.rundir.files import QUANT_FILE
from moekit.rundir.weights import CheckpointError

if TYPE_CHECKING:
    from moekit.rundir.run import RunDir

__all__ = ["load_quantized", "read_quant_spec"]


def read_quant_spec(run: RunDir) -> QuantSpec:
    """The format of a quantized run (its ``quantization.json``)."""
    return QuantSpec.from_dict(json.loads((run.path / QUANT_FILE).read_text()))


def load_quantized(run: RunDir, dtype: torch.dtype | None = None, skip: frozenset[str] = frozenset()) -> nn.Module:
    """The quantized model of ``run`` (eval mode): stored tensors are assigned as read, not dequantized.
    ``dtype`` casts the unquantized floating tensors (embeddings, norms, ...) only. Tensors named in
    ``skip`` are not read and stay on the meta device (the expert store of an offloaded model reads them)."""
    from moekit.nn.transformer import MoETransformer

    spec = read_quant_spec(run)
    with torch.device("meta"):
        model = MoETransformer(run.config())
        swap_in_quantized(model, spec)
    meta = model.state_dict()
    with safe_open(str(run.model_path), "pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(meta) - keys), sorted(keys - set(meta))
        if missing or unexpected:
            raise CheckpointError(f"{run.model_path} does not match its {QUANT_FILE}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        state = {}
        for k in meta:
            if k in skip:
                state[k] = meta[k]
                continue
            t = f.get_tensor(k)
            state[k] = t.to(dtype) if dtype is not None and t.dtype in (torch.float32, torch.bfloat16) and \
                not k.endswith(("_scale", "_base", "expert_bias")) else t
    model.load_state_dict(state, strict=True, assign=True)
    model.quant_spec = spec
    hf = run.hf_config()
    if hf is not None:
        model.hf_config = hf
    return model.eval()
