"""Load any model directory moekit can run for inference, and its document start / end token ids.

One owner for the choice ``moekit generate`` and ``moekit serve`` both make: a moekit run directory goes
through :func:`moekit.infer.generate.load_run` (weights checked against the checkpoint manifest); any
other directory (an HF model directory) through ``moekit.hf.load_any`` when that package is present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["choose_decode_threads", "count_params", "load_for_inference", "load_maybe_offloaded",
           "non_expert_bytes", "ready_to_decode", "special_ids", "weight_bytes_per_token"]


def load_for_inference(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer). A moekit run directory goes through ``moekit.infer.load_run``, which checks the
    weights against the checkpoint manifest and names the damaged file; any other directory (an HF model
    directory) through ``moekit.hf.load_any`` when that package is present -- and so does a run directory
    that keeps an HF model's config as hf_config.json (``moekit convert``, ``train --init-from``): its
    tokenizer is the HF model's, which may have no <|endoftext|>, and its bos/eos ids are in that config."""
    from moekit.infer.generate import load_run
    from moekit.rundir import RunDir

    path = str(path)
    try:
        from moekit.hf import is_moekit_dir, load_any
    except ImportError:  # moekit.hf is optional: run directories only
        return load_run(path)
    run = RunDir(path)
    if not run.is_run() or (is_moekit_dir(path) and not run.hf_config_path.is_file()):
        return load_run(path)
    model, tok = load_any(path)
    if tok is None:
        raise FileNotFoundError(f"{path}: no tokenizer.json; a model needs one to encode the prompt")
    return model, tok


def special_ids(model: Any, tok: Any, path: str | Path | None = None) -> tuple[int | None, int | None]:
    """(start, end) token ids: moekit's document separator, else the HF config's bos/eos ids (the end, else
    the eos token of ``path``'s tokenizer_config.json / config.json, as the training data separated them)."""
    from moekit.data import EOT, document_separator

    eot = tok.token_to_id(EOT)
    if eot is not None:
        return eot, eot
    hf = getattr(model, "hf_config", None) or {}

    def first(v):
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)

    end = first(hf.get("eos_token_id"))
    if end is None and path is not None:
        end = document_separator(tok, str(path))
    return first(hf.get("bos_token_id")), end


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step of one token reads: every parameter outside the routed experts
    plus, in each MoE layer, its top-k experts (from the config, so an offloaded model is not touched)."""
    routed = 0
    item = model.embed.weight.element_size()  # routed experts are stored in the model's dtype
    for block in model.layers:
        if not block.is_moe:
            continue
        cfg = block.ffn.cfg
        mats = 3 if cfg.activation == "swiglu" else 2
        routed += cfg.active_k * mats * cfg.d_model * cfg.d_hidden * item
    return non_expert_bytes(model) + routed


def non_expert_bytes(model: Any) -> int:
    """Bytes of every weight and buffer outside the routed experts (what stays resident when they are offloaded)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".ffn.experts." not in k)


def choose_decode_threads(model: Any) -> int:
    """:func:`moekit.runtime.decode_threads` for this model: the default of ``generate`` and ``serve``."""
    from moekit.runtime import decode_threads

    return decode_threads(weight_bytes_per_token(model))


def ready_to_decode(model: Any, threads: int | None) -> float:
    """Set the intra-op threads (None: :func:`choose_decode_threads`) and compile the single-row kernels the
    model's large weights take (``moekit.ops.gemv.warm_up``), so the first decode step is not seconds long.
    Returns the seconds compiling took (0.0: no weight is large enough to need them)."""
    import time

    import torch

    from moekit.ops.gemv import warm_up

    torch.set_num_threads(threads if threads is not None else choose_decode_threads(model))
    t0 = time.perf_counter()
    moe = getattr(model.config, "moe", None)  # routed experts kept on disk are not in the state dict
    dtype = next(model.parameters()).dtype
    experts = [(moe.d_hidden, moe.d_model, dtype)] if moe is not None else []
    return time.perf_counter() - t0 if warm_up(model.state_dict().values(), experts) else 0.0


def load_maybe_offloaded(path: str | Path, offload: dict | None = None, dtype: str | None = None,
                         record_trace: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, OffloadedModel or None): with ``offload`` (``moekit.infer.offload.load_offloaded``'s
    keywords) the routed experts stay on disk behind a cache whose trace is kept only if ``record_trace``;
    without, :func:`load_for_inference`, cast to ``dtype`` if given."""
    import torch

    if offload is None:
        model, tok = load_for_inference(path)
        return (model if dtype is None else model.to(getattr(torch, dtype))), tok, None
    from moekit.infer.offload import load_offloaded

    om = load_offloaded(path, dtype=dtype, **offload)
    om.cache.trace.record = record_trace
    return om.model, om.tokenizer, om


def count_params(model: Any) -> dict[str, int]:
    """Total and active parameters (``num_params``); of an offloaded model, whose experts are not
    parameters, counted on a weightless copy of its architecture."""
    import torch

    from moekit.nn.transformer import MoETransformer

    if all(isinstance(getattr(m.experts, "w_up", None), torch.Tensor) for m in model.moe_layers()):
        return model.num_params()
    with torch.device("meta"):
        return MoETransformer(model.config).num_params()
