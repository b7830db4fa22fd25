"""Architecture adapters as data, and the generic machinery that applies them.

Legend: E experts, H expert hidden, D model dim.

An :class:`Adapter` holds, for one HF ``model_type``: a config translation each way, a table of
tensor renames (moekit state-dict prefix -> HF prefix, first match wins), the per-expert tensor
names that are stacked into moekit's (E, H, D) / (E, D, H) expert tensors, and per-tensor transforms
(e.g. the RoPE row permutation of checkpoints stored in the interleaved layout). Loading and saving
below know nothing of any particular architecture; the config helpers the adapters share are in
moekit.hf.fields, the adapters themselves in moekit.hf.arch_*.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.hf.common import ShardReader
from moekit.nn.transformer import ModelConfig

__all__ = ["Adapter", "ExpertNames", "hf_name", "load_state", "save_entries"]

Transform = Callable[[Tensor, ModelConfig, dict[str, Any]], Tensor]  # (tensor, moekit cfg, HF cfg)

# moekit name -> HF name, outside the decoder layers
GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# inside layer i ("layers.{i}." <-> "model.layers.{i}."), after an adapter's own renames; {moe} = MoE block prefix
COMMON_RENAMES = (
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn.", "self_attn."),
    ("ffn.router.weight", "{moe}gate.weight"),
    ("ffn.", "mlp."),  # dense layers: gate_proj / up_proj / down_proj keep their names
)
# always skipped on load: RoPE tables some old checkpoints saved
ALWAYS_IGNORED = (r".*rotary_emb\.inv_freq$",)
_EXPERT_KEY = re.compile(r"layers\.(\d+)\.ffn\.experts\.(w_gate|w_up|w_down)")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class ExpertNames:
    """Where a layer's routed experts live in HF checkpoints.

    Per-expert layout (the hub's): ``{prefix}experts.{e}.{gate|up|down}.weight``, (H, D) / (D, H).
    Fused layout (transformers >= 5 in memory): ``{prefix}experts.gate_up_proj`` (E, 2H, D), gate first,
    and ``{prefix}experts.down_proj`` (E, D, H). ``alt_prefixes`` are also accepted when reading.
    """

    prefix: str = "mlp."
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    alt_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adapter:
    """One HF architecture: config translation both ways and the tensor-name tables (see module doc)."""

    model_type: str
    architecture: str
    to_moekit: Callable[[dict[str, Any]], ModelConfig]
    from_moekit: Callable[[ModelConfig], dict[str, Any]]  # raises ValueError naming what cannot be expressed
    # per-layer (moekit prefix, HF prefix), tried before COMMON_RENAMES
    renames: tuple[tuple[str, str], ...] = ()
    experts: ExpertNames = ExpertNames()
    transforms: tuple[tuple[str, Transform, Transform], ...] = ()  # (moekit layer suffix, to moekit, to HF)
    keep_fp32: tuple[str, ...] = ("ffn.router.expert_bias",)  # moekit layer suffixes held in fp32
    ignore: tuple[str, ...] = ()  # regexes of HF tensors skipped on load
    ignore_extra_layers: bool = False  # layers >= num_hidden_layers (multi-token-prediction heads)
    passthrough: tuple[str, ...] = ()  # HF config fields a loaded model writes back as they were

    def transform(self, suffix: str, direction: int) -> Transform | None:
        for s, to_moekit, to_hf in self.transforms:
            if s == suffix:
                return (to_moekit, to_hf)[direction]
        return None


def hf_name(adapter: Adapter, key: str, moe_prefix: str) -> str:
    """HF tensor name of a (non-expert) moekit state-dict key."""
    if key in GLOBAL_NAMES:
        return GLOBAL_NAMES[key]
    m = _LAYER_KEY.fullmatch(key)
    if m:
        i, rest = m.groups()
        for src, dst in adapter.renames + COMMON_RENAMES:
            if rest.startswith(src):
                return f"model.layers.{i}." + dst.format(moe=moe_prefix) + rest[len(src) :]
    raise ValueError(f"{adapter.model_type}: no HF name for moekit tensor {key!r}")


def _suffix(key: str) -> str:
    m = _LAYER_KEY.fullmatch(key)
    return m.group(2) if m else key


def _expert_keys(ex: ExpertNames, layer: str, moe: str, which: str, E: int) -> list[str]:
    name = {"w_gate": ex.gate, "w_up": ex.up, "w_down": ex.down}[which]
    return [f"{layer}{moe}experts.{e}.{name}.weight" for e in range(E)]


# ---------------------------------------------------------------------------------------- loading
def _moe_prefix(adapter: Adapter, reader: ShardReader) -> str:
    prefixes = (adapter.experts.prefix, *adapter.experts.alt_prefixes)
    for p in prefixes:
        if any(f".{p}experts." in k or f".{p}gate." in k for k in reader):
            return p
    return adapter.experts.prefix


def load_state(
    adapter: Adapter,
    cfg: ModelConfig,
    hf_cfg: dict[str, Any],
    reader: ShardReader,
    meta_state: dict[str, Tensor],
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Read every tensor of ``meta_state`` (a meta-device state dict) from ``reader``, in ``dtype``.

    1. plan: name every HF tensor each moekit tensor needs; report all missing, misshapen and unknown
       tensors at once, before reading anything
    2. read one tensor (or one expert's slice) at a time into its final, preallocated storage
    """
    moe = _moe_prefix(adapter, reader)
    plan: dict[str, tuple[str, Any]] = {}
    missing, wrong, used = [], [], set()

    def need(key: str, shape: tuple[int, ...] | None) -> None:
        used.add(key)
        if key not in reader:
            missing.append(key)
        elif shape is not None and reader.shape(key) != tuple(shape):
            wrong.append(f"{key}: checkpoint {reader.shape(key)}, expected {tuple(shape)}")

    for name, t in meta_state.items():
        m = _EXPERT_KEY.fullmatch(name)
        if m:
            layer, which = f"model.layers.{m.group(1)}.", m.group(2)
            E, *rest = t.shape
            fused_gu, fused_d = f"{layer}{moe}experts.gate_up_proj", f"{layer}{moe}experts.down_proj"
            if which == "w_down" and fused_d in reader:
                need(fused_d, t.shape)
                plan[name] = ("fused", fused_d)
            elif which != "w_down" and fused_gu in reader:
                need(fused_gu, (E, 2 * rest[0], rest[1]))
                plan[name] = ("fused_gate" if which == "w_gate" else "fused_up", fused_gu)
            else:
                keys = _expert_keys(adapter.experts, layer, moe, which, E)
                for k in keys:
                    need(k, tuple(rest))
                plan[name] = ("stack", keys)
            continue
        key = hf_name(adapter, name, moe)
        tf = adapter.transform(_suffix(name), 0)
        need(key, None if tf else t.shape)
        plan[name] = ("plain", key)
    if cfg.tie_embeddings:
        used.add(GLOBAL_NAMES["lm_head.weight"])  # tied: a stored copy of the head is not used
    n_layers = cfg.n_layers
    ignored = [re.compile(p) for p in ALWAYS_IGNORED + adapter.ignore]

    def is_ignored(k: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if adapter.ignore_extra_layers and m and int(m.group(1)) >= n_layers:
            return True
        return any(p.fullmatch(k) for p in ignored)

    unexpected = sorted(k for k in reader if k not in used and not is_ignored(k))
    if missing or wrong or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing tensors {missing[:6]}"
                + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            )
        if wrong:
            parts.append(f"tensors of the wrong shape {wrong[:6]}")
        if unexpected:
            parts.append(
                f"tensors moekit does not know {unexpected[:6]}"
                + (f" (+{len(unexpected) - 6} more)" if len(unexpected) > 6 else "")
                + " (a feature moekit does not implement?)"
            )
        raise ValueError(
            f"{reader.path} ({adapter.model_type}) does not match its config.json: " + "; ".join(parts)
        )

    state: dict[str, Tensor] = {}
    for name, t in meta_state.items():
        kind, src = plan[name]
        keep32 = _suffix(name) in adapter.keep_fp32 and t.is_floating_point()
        dst = torch.empty(
            t.shape, dtype=torch.float32 if keep32 else dtype if t.is_floating_point() else t.dtype
        )
        if kind == "plain":
            x = reader.get(src)
            tf = adapter.transform(_suffix(name), 0)
            if tf is not None:
                x = tf(x, cfg, hf_cfg)
                if tuple(x.shape) != tuple(t.shape):
                    raise ValueError(
                        f"{src}: checkpoint {reader.shape(src)} does not fit moekit {tuple(t.shape)}"
                    )
            dst.copy_(x)
        elif kind == "stack":
            for e, k in enumerate(src):
                dst[e].copy_(reader.get(k))
        else:  # fused, read one expert at a time
            H = t.shape[1]
            for e in range(t.shape[0]):
                x = reader.get(src, index=e)
                dst[e].copy_(x if kind == "fused" else x[:H] if kind == "fused_gate" else x[H:])
        state[name] = dst
    reader.close()
    return state


# ----------------------------------------------------------------------------------------- saving
def save_entries(
    adapter: Adapter, cfg: ModelConfig, hf_cfg: dict[str, Any], state: dict[str, Tensor]
) -> Iterator[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]]:
    """(HF name, shape, dtype, make_tensor) of every tensor to write, experts unstacked per expert."""
    moe = adapter.experts.prefix
    for name, t in state.items():
        m = _EXPERT_KEY.fullmatch(name)
        if m:
            keys = _expert_keys(adapter.experts, f"model.layers.{m.group(1)}.", moe, m.group(2), t.shape[0])
            for e, k in enumerate(keys):
                yield k, tuple(t.shape[1:]), t.dtype, (lambda t=t, e=e: t[e])
            continue
        tf = adapter.transform(_suffix(name), 1)
        shape = tuple(tf(t.to("meta"), cfg, hf_cfg).shape) if tf else tuple(t.shape)
        yield (
            hf_name(adapter, name, moe),
            shape,
            t.dtype,
            (lambda t=t, tf=tf: tf(t, cfg, hf_cfg) if tf else t),
        )
