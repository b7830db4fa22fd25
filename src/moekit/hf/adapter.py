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

from moekit.config import ModelConfig
from moekit.hf.common import ShardReader

__all__ = ["Adapter", "Entry", "ExpertNames", "FusedIO", "hf_name", "load_state", "save_entries"]

Transform = Callable[[Tensor, ModelConfig, dict[str, Any]], Tensor]  # (tensor, moekit cfg, HF cfg)

# moekit name -> HF name, outside the decoder layers
GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "norm.bias": "model.norm.bias",  # LayerNorm models (PhiMoE)
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
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


Entry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]  # (HF name, shape, dtype, make_tensor)


@dataclass(frozen=True)
class ExpertRows:
    """Where each expert's matrices lie in a layer's fused expert tensors (names relative to the HF layer
    prefix), for readers that fetch one expert at a time (``moekit.infer.store``): ``gate_up`` (E, 2H, D),
    gate rows first, or ``gate_up_interleaved`` (E, D, 2H), (in, out) with gate and up alternating in the
    last dim (gpt-oss), or ``gate`` and ``up`` (E·H, D); ``down`` (E, D, H), or with ``down_transposed``
    each expert's (H, D) transpose. ``flat``: the tensors are 2-D (E·H, D), expert e's rows [eH, (e+1)H)."""

    down: str
    gate_up: str | None = None
    gate_up_interleaved: str | None = None
    gate: str | None = None
    up: str | None = None
    down_transposed: bool = False
    flat: bool = False


@dataclass(frozen=True)
class FusedIO:
    """Layer tensors an architecture stores fused (gpt-oss's fused or MXFP4 experts, DBRX's Wqkv).

    ``suffixes``: the moekit layer suffixes it owns. ``source(plan, layer, suffix, shape)`` notes the HF
    tensors it needs on ``plan`` (``plan.need``) and returns ``("fn", fill)``, ``fill(dst)`` reading them
    into ``dst`` (experts one at a time); ``layer`` is the HF layer prefix, e.g. ``model.layers.{i}.``.
    ``entries(layer, tensors, hf_cfg)`` is what a layer's owned tensors (suffix -> tensor) are saved as.
    ``rows``: for fused experts whose matrices are each one byte range, where they lie (None: they are
    not, as gpt-oss's interleaved gate/up columns).
    """

    suffixes: tuple[str, ...]
    source: Callable[[Any, str, str, tuple[int, ...]], Any]
    entries: Callable[[str, dict[str, Tensor], dict[str, Any]], list[Entry]]
    rows: ExpertRows | None = None


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
    # moekit layer suffixes the architecture stores no tensor for (DeepSeek-V2's routing bias, which it
    # does not have): zero on load; saving refuses a nonzero one, which the HF model could not express
    absent: tuple[str, ...] = ()
    fused: tuple[FusedIO, ...] = ()  # layer tensors stored fused (an expert layout of its own, ...)
    layer_prefix: str = "model.layers."  # HF prefix of layer i is f"{layer_prefix}{i}."
    global_names: tuple[tuple[str, str], ...] = ()  # moekit -> HF names outside the layers, over GLOBAL_NAMES

    def global_name(self, key: str) -> str | None:
        return dict(self.global_names).get(key, GLOBAL_NAMES.get(key))

    def fused_io(self, suffix: str) -> FusedIO | None:
        return next((io for io in self.fused if suffix in io.suffixes), None)

    def transform(self, suffix: str, direction: int) -> Transform | None:
        for s, to_moekit, to_hf in self.transforms:
            if s == suffix:
                return (to_moekit, to_hf)[direction]
        return None


def hf_name(adapter: Adapter, key: str, moe_prefix: str) -> str:
    """HF tensor name of a (non-expert) moekit state-dict key."""
    if adapter.global_name(key) is not None:
        return adapter.global_name(key)
    m = _LAYER_KEY.fullmatch(key)
    if m:
        i, rest = m.groups()
        for src, dst in adapter.renames + COMMON_RENAMES:
            if rest.startswith(src):
                return f"{adapter.layer_prefix}{i}." + dst.format(moe=moe_prefix) + rest[len(src) :]
    raise ValueError(f"{adapter.model_type}: no HF name for moekit tensor {key!r}")


def _suffix(key: str) -> str:
    m = _LAYER_KEY.fullmatch(key)
    return m.group(2) if m else key


def _expert_keys(ex: ExpertNames, layer: str, moe: str, which: str, E: int) -> list[str]:
    name = {"w_gate": ex.gate, "w_up": ex.up, "w_down": ex.down}[which]
    return [f"{layer}{moe}experts.{e}.{name}.weight" for e in range(E)]


# ---------------------------------------------------------------------------------------- loading
# A source says how one moekit tensor is read: ("plain", HF name), through the adapter's transform if it
# has one; ("stack", [HF name per expert]); or ("fused" | "fused_gate" | "fused_up", HF name) for a fused
# expert tensor, read whole or as its gate / up half, one expert at a time; ("zeros", None) for a tensor
# the architecture does not store.
Source = tuple[str, Any]


def _moe_prefix(adapter: Adapter, reader: ShardReader) -> str:
    prefixes = (adapter.experts.prefix, *adapter.experts.alt_prefixes)
    for p in prefixes:
        if any(f".{p}experts." in k or f".{p}gate." in k for k in reader):
            return p
    return adapter.experts.prefix


class _Plan:
    """The source of every moekit tensor, and what the checkpoint lacks, gathered before reading anything."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self.sources: dict[str, Source] = {}
        self.missing: list[str] = []
        self.wrong: list[str] = []  # "name: checkpoint shape, expected shape"
        self.used: set[str] = set()  # HF names some moekit tensor reads (or deliberately skips)

    def need(self, key: str, shape: tuple[int, ...] | None) -> None:
        """Record that ``key`` is read; note it missing, or misshapen when ``shape`` is given."""
        self.used.add(key)
        if key not in self.reader:
            self.missing.append(key)
        elif shape is not None and self.reader.shape(key) != tuple(shape):
            self.wrong.append(f"{key}: checkpoint {self.reader.shape(key)}, expected {tuple(shape)}")


def _expert_source(
    plan: _Plan, adapter: Adapter, moe: str, layer_index: str, which: str, shape: tuple[int, ...]
) -> Source:
    """Source of a layer's stacked ``which`` experts: the fused HF tensor if stored, else one per expert."""
    layer = f"{adapter.layer_prefix}{layer_index}."
    E, *rest = shape  # (E, H, D) for w_gate / w_up, (E, D, H) for w_down
    fused_gu, fused_d = f"{layer}{moe}experts.gate_up_proj", f"{layer}{moe}experts.down_proj"
    if which == "w_down" and fused_d in plan.reader:
        plan.need(fused_d, shape)
        return ("fused", fused_d)
    if which != "w_down" and fused_gu in plan.reader:
        plan.need(fused_gu, (E, 2 * rest[0], rest[1]))
        return ("fused_gate" if which == "w_gate" else "fused_up", fused_gu)
    keys = _expert_keys(adapter.experts, layer, moe, which, E)
    for k in keys:
        plan.need(k, tuple(rest))
    return ("stack", keys)


def _plan_sources(
    adapter: Adapter, cfg: ModelConfig, reader: ShardReader, meta_state: dict[str, Tensor], moe: str
) -> _Plan:
    """Name every HF tensor each moekit tensor needs, noting the missing and misshapen ones."""
    plan = _Plan(reader)
    for name, t in meta_state.items():
        if _suffix(name) in adapter.absent:
            plan.sources[name] = ("zeros", None)
            continue
        m = _LAYER_KEY.fullmatch(name)
        io = adapter.fused_io(m.group(2)) if m else None
        if io is not None:
            plan.sources[name] = io.source(plan, f"{adapter.layer_prefix}{m.group(1)}.", m.group(2), tuple(t.shape))
            continue
        m = _EXPERT_KEY.fullmatch(name)
        if m:
            plan.sources[name] = _expert_source(plan, adapter, moe, m.group(1), m.group(2), tuple(t.shape))
            continue
        key = hf_name(adapter, name, moe)
        tf = adapter.transform(_suffix(name), 0)
        plan.need(key, None if tf else t.shape)  # a transform may change the shape: checked after it
        plan.sources[name] = ("plain", key)
    if cfg.tie_embeddings:
        plan.used.add(adapter.global_name("lm_head.weight"))  # tied: a stored copy of the head is not used
    return plan


def _unexpected(adapter: Adapter, cfg: ModelConfig, reader: ShardReader, used: set[str]) -> list[str]:
    """Checkpoint tensors, sorted, that no moekit tensor reads and no ignore rule of the adapter covers."""
    ignored = [re.compile(p) for p in ALWAYS_IGNORED + adapter.ignore]

    def is_ignored(k: str) -> bool:
        m = re.match(re.escape(adapter.layer_prefix) + r"(\d+)\.", k)
        if adapter.ignore_extra_layers and m and int(m.group(1)) >= cfg.n_layers:
            return True
        return any(p.fullmatch(k) for p in ignored)

    return sorted(k for k in reader if k not in used and not is_ignored(k))


def _first_six(keys: list[str]) -> str:
    return f"{keys[:6]}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")


def _check_plan(adapter: Adapter, reader: ShardReader, plan: _Plan, unexpected: list[str]) -> None:
    """Raise one ValueError naming the missing, misshapen and unknown tensors all at once."""
    parts = []
    if plan.missing:
        parts.append(f"missing tensors {_first_six(plan.missing)}")
    if plan.wrong:
        parts.append(f"tensors of the wrong shape {plan.wrong[:6]}")
    if unexpected:
        parts.append(
            f"tensors moekit does not know {_first_six(unexpected)} (a feature moekit does not implement?)"
        )
    if parts:
        raise ValueError(
            f"{reader.path} ({adapter.model_type}) does not match its config.json: " + "; ".join(parts)
        )


def _empty_for(adapter: Adapter, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Storage for meta tensor ``t``: floats in ``dtype`` (fp32 where the adapter says), others as is."""
    if not t.is_floating_point():
        return torch.empty(t.shape, dtype=t.dtype)
    return torch.empty(t.shape, dtype=torch.float32 if _suffix(name) in adapter.keep_fp32 else dtype)


def _read_into(
    dst: Tensor, name: str, source: Source, adapter: Adapter, cfg: ModelConfig, hf_cfg: dict[str, Any],
    reader: ShardReader,
) -> None:
    """Copy moekit tensor ``name`` from its source into ``dst``, one HF tensor or expert slice at a time."""
    kind, src = source
    if kind == "zeros":
        dst.zero_()
    elif kind == "fn":
        src(dst)
    elif kind == "plain":
        x = reader.get(src)
        tf = adapter.transform(_suffix(name), 0)
        if tf is not None:
            x = tf(x, cfg, hf_cfg)
            if tuple(x.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{src}: checkpoint {reader.shape(src)} does not fit moekit {tuple(dst.shape)}"
                )
        dst.copy_(x)
    elif kind == "stack":
        for e, k in enumerate(src):
            dst[e].copy_(reader.get(k))
    else:  # fused, read one expert at a time
        H = dst.shape[1]
        for e in range(dst.shape[0]):
            x = reader.get(src, index=e)
            dst[e].copy_(x if kind == "fused" else x[:H] if kind == "fused_gate" else x[H:])


def load_state(
    adapter: Adapter,
    cfg: ModelConfig,
    hf_cfg: dict[str, Any],
    reader: ShardReader,
    meta_state: dict[str, Tensor],
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Read every tensor of ``meta_state`` (a meta-device state dict) from ``reader``, in ``dtype``."""
    # 1. plan: name every HF tensor each moekit tensor needs; report all missing, misshapen and unknown
    #    tensors at once, before reading anything
    plan = _plan_sources(adapter, cfg, reader, meta_state, _moe_prefix(adapter, reader))
    _check_plan(adapter, reader, plan, _unexpected(adapter, cfg, reader, plan.used))
    # 2. read one tensor (or one expert's slice) at a time into its final, preallocated storage
    state: dict[str, Tensor] = {}
    for name, t in meta_state.items():
        state[name] = dst = _empty_for(adapter, name, t, dtype)
        _read_into(dst, name, plan.sources[name], adapter, cfg, hf_cfg, reader)
    reader.close()
    return state


# ----------------------------------------------------------------------------------------- saving
def save_entries(
    adapter: Adapter, cfg: ModelConfig, hf_cfg: dict[str, Any], state: dict[str, Tensor]
) -> Iterator[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]]:
    """(HF name, shape, dtype, make_tensor) of every tensor to write, experts unstacked per expert."""
    moe = adapter.experts.prefix
    owned: dict[tuple[int, str], dict[str, Tensor]] = {}  # (FusedIO, HF layer prefix) -> its tensors there
    for name, t in state.items():
        m = _LAYER_KEY.fullmatch(name)
        io = adapter.fused_io(m.group(2)) if m else None
        if io is not None:
            owned.setdefault((adapter.fused.index(io), f"{adapter.layer_prefix}{m.group(1)}."), {})[m.group(2)] = t
            continue
        if _suffix(name) in adapter.absent:
            if t.count_nonzero():
                raise ValueError(f"{name} is nonzero: {adapter.model_type} has no such tensor")
            continue
        m = _EXPERT_KEY.fullmatch(name)
        if m:
            keys = _expert_keys(adapter.experts, f"{adapter.layer_prefix}{m.group(1)}.", moe, m.group(2), t.shape[0])
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
    for (i, layer), tensors in owned.items():
        yield from adapter.fused[i].entries(layer, tensors, hf_cfg)
