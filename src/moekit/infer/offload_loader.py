"""Build an offloaded model: experts on the meta device, everything else filled from the checkpoint.

1. read the config (moekit run directory or HF config.json through its adapter);
2. build the :class:`ExpertStore` over the checkpoint files: every expert tensor is located and checked
   against the file sizes now, so a missing or truncated shard fails here, naming file and tensor;
3. size the cache from the budget (refusing one below a layer's top-k experts);
4. build the model on the meta device, fill every non-expert tensor from the checkpoint (the expert
   tensors stay meta and are dropped), and swap each MoE layer's experts for :class:`OffloadedExperts`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.infer.offload import ExpertCache, OffloadedExperts, OffloadedModel
from moekit.infer.offload_biased import OffloadedBiasedExperts
from moekit.infer.prefetch import Prefetcher
from moekit.infer.store import ExpertStore, StoreError
from moekit.nn.biased_experts import BiasedExperts
from moekit.rundir import TOKENIZER_FILE

__all__ = ["build_offloaded", "min_budget"]


class _NonExperts:
    """A ShardReader that does not show the routed-expert tensors (the store reads those)."""

    def __init__(self, reader: Any, hidden: set[str]):
        self._r, self._hidden = reader, hidden
        self.path = reader.path

    def __iter__(self):
        return (k for k in self._r if k not in self._hidden)

    def __contains__(self, key: str) -> bool:
        return key not in self._hidden and key in self._r

    def __getattr__(self, name: str):
        return getattr(self._r, name)


def _layers(cfg) -> dict[int, tuple[int, int, int, bool]]:
    m = cfg.moe
    return {i: (m.num_experts, m.d_hidden, cfg.d_model, m.activation == "swiglu")
            for i in range(cfg.n_layers) if cfg.is_moe_layer(i)}


def min_budget(cfg, expert_bytes: int) -> int:
    """The smallest expert memory that works: one layer's top-k experts resident at once."""
    return cfg.moe.top_k * expert_bytes if cfg.moe.router != "dense" else cfg.moe.num_experts * expert_bytes


def _capacity(budget: int | str, cfg, store: ExpertStore, dtype: torch.dtype, slot_bytes: int) -> tuple[int, bool]:
    total = store.num_experts()
    need = cfg.moe.top_k if cfg.moe.router != "dense" else cfg.moe.num_experts
    if budget == "all":
        return total, True
    if budget == 0:
        return need, False
    cap = min(int(budget) // slot_bytes, total)
    if cap < need:
        raise ValueError(
            f"expert memory {budget} bytes holds {cap} experts of {slot_bytes} bytes; a layer needs its "
            f"top_k={need} experts resident at once: use at least {need * slot_bytes} bytes "
            f"({need * slot_bytes / 2**20:.1f} MiB), or 0 for no cache")
    return cap, True


def _read_config(path: Path):
    from moekit.hf.api import ADAPTERS, is_moekit_dir
    from moekit.hf.common import CONFIG_FILE, read_json
    from moekit.rundir import RunDir

    if is_moekit_dir(path):
        return RunDir(path).config(), None, None
    hf = read_json(path / CONFIG_FILE)
    adapter = ADAPTERS.get(hf.get("model_type"))
    if adapter is None:
        raise ValueError(f"{path / CONFIG_FILE}: model_type={hf.get('model_type')!r} is not supported")
    return adapter.to_moekit(hf), hf, adapter


def _moe_prefix(adapter, names: set[str]) -> str:
    for p in (adapter.experts.prefix, *adapter.experts.alt_prefixes):
        if any(f".{p}experts." in k for k in names):
            return p
    return adapter.experts.prefix


def _expert_rows(adapter):
    """The adapter's placement of fused expert matrices (None: per-expert or gate_up_proj tensors)."""
    io = adapter.fused_io("ffn.experts.w_up") if adapter is not None else None
    return None if io is None else io.rows


def _refuse_unsupported(path: Path, hf: dict | None, adapter) -> None:
    fused = adapter is not None and adapter.fused_io("ffn.experts.w_up") is not None
    if fused and _expert_rows(adapter) is None:
        raise ValueError(f"{path}: {hf.get('model_type')}'s fused expert tensors cannot be read one expert at a "
                         "time; expert offloading does not support them: load it whole")



def build_offloaded(path: Path, budget: int | str, policy: str, prefetch: bool, read: str,
                    dtype: torch.dtype | str | None, predictor: Any = None) -> OffloadedModel:
    from moekit.hf.adapter import load_state
    from moekit.hf.common import ShardReader, parse_dtype
    from moekit.rundir import CheckpointError, materialise

    # 1. config
    cfg, hf, adapter = _read_config(path)
    _refuse_unsupported(path, hf, adapter)
    want = parse_dtype(dtype)
    # 2. the store (validates every expert extent)
    if adapter is None:
        store = ExpertStore(path, _layers(cfg), layout="moekit", read=read)
    else:
        from moekit.infer.store import _weight_files

        prefix = _moe_prefix(adapter, set(_weight_files(path)))
        names = {"gate": adapter.experts.gate, "up": adapter.experts.up, "down": adapter.experts.down}
        store = ExpertStore(path, _layers(cfg), layout="hf", moe_prefix=prefix, names=names, read=read,
                            layer_prefix=adapter.layer_prefix, rows=_expert_rows(adapter))
    try:
        reader = ShardReader(path)
    except ValueError as e:
        store.close()
        raise StoreError(str(e)) from e
    visible = _NonExperts(reader, store.tensor_names)
    if adapter is None:
        expert_dtype = want or store.file_dtype
    else:
        embed = adapter.global_name("embed.weight")
        expert_dtype = want or (reader.dtype(embed) if embed in reader else torch.float32)
    # 3. the budget
    slot_bytes = store.expert_nbytes(expert_dtype)  # the budget counts weights; slot padding is <= 12 KiB more
    capacity, retain = _capacity(budget, cfg, store, expert_dtype, slot_bytes)
    cache = ExpertCache(store, capacity, policy, retain=retain, dtype=expert_dtype)

    # 4. the model: non-expert tensors filled, experts left meta, then swapped
    def fill(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the routed experts' matrices stay on disk; biased experts' biases (small) are resident
        experts = {k: t for k, t in meta.items() if ".ffn.experts." in k and not k.endswith("_bias")}
        rest = {k: t for k, t in meta.items() if k not in experts}
        if adapter is not None:
            state = load_state(adapter, cfg, hf, visible, rest, expert_dtype)
        else:
            state = {}
            missing = [k for k in rest if k not in visible]
            wrong = [k for k in rest if k in visible and tuple(visible.shape(k)) != tuple(rest[k].shape)]
            if missing or wrong:
                raise CheckpointError(f"{path} does not match its config: missing {missing[:5]} wrong shape {wrong[:5]}")
            for k in rest:
                x = visible.get(k)
                keep = want is None or not x.is_floating_point() or k.endswith("expert_bias")
                state[k] = x if keep else x.to(want)
            reader.close()
        return {**state, **experts}

    model = materialise(cfg, fill)
    _swap_experts(model, cache)
    if hf is not None:
        model.hf_config = hf
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"offloaded model: tensors left on the meta device: {on_meta[:5]}")
    non_expert = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    pre = Prefetcher(model, cache, predictor=predictor) if prefetch else None
    return OffloadedModel(model, _tokenizer(path, adapter is None), cache, pre, path, non_expert)


def _swap_experts(model, cache: ExpertCache) -> None:
    """Each MoE layer's experts replaced by their offloaded twin (biased ones keep their biases)."""
    for b in model.layers:
        if b.is_moe and isinstance(b.ffn.experts, BiasedExperts):
            b.ffn.experts = OffloadedBiasedExperts(b.idx, cache, b.ffn.experts)
        elif b.is_moe:
            m = b.ffn.cfg
            b.ffn.experts = OffloadedExperts(b.idx, cache, m.num_experts, model.config.d_model, m.d_hidden,
                                             m.activation, m.expert_impl)


def _tokenizer(path: Path, moekit_dir: bool):
    if not (path / TOKENIZER_FILE).is_file():
        return None
    if moekit_dir:  # configured as moekit.data.tokenizer does (what RunDir's tokenizer reader calls)
        from moekit.data.tokenizer import load_tokenizer

        return load_tokenizer(path / TOKENIZER_FILE)
    from moekit.data.tokenizer import read_tokenizer_file

    return read_tokenizer_file(path / TOKENIZER_FILE)
