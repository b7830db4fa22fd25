"""Decoder-only MoE Transformer LM (Mixtral-style): embed -> N x (norm, attention, norm, FFN) -> norm -> head.

Legend: B batch, S sequence, D model dim, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.nn.attention import Attention, KVCache, RMSNorm, build_attn_mask, rope_cos_sin
from moekit.nn.experts import MLP
from moekit.nn.mla import MLAConfig, MultiHeadLatentAttention
from moekit.nn.moe import MoELayer, MoEOutput, MoEStats

__all__ = ["ModelConfig", "MoETransformer", "ModelOutput", "KVCache"]


@dataclass(frozen=True)
class ModelConfig:
    """Whole-model configuration; JSON round-trips through ``to_json``/``from_json``."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head)
    head_dim: int | None = None  # None = d_model // n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attn_bias: bool = False
    qk_norm: bool = False
    # feed-forward: MoE everywhere unless dense; dense layers use a SwiGLU MLP of dense_d_hidden
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=128, d_hidden=256))
    dense: bool = False
    dense_d_hidden: int | None = None  # None = moe.top_k * moe.d_hidden (same active FFN width)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 ...
    first_dense_layers: int = 0  # ... and i >= first_dense_layers
    init_std: float = 0.02
    # attention variants (checkpoint interop): o_proj bias; q/k norm per head ("head", Qwen3) or over the
    # whole projection ("full", OLMoE); clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE)
    attn_out_bias: bool = False
    qk_norm_scope: str = "head"
    clip_qkv: float | None = None
    dense_layers: tuple[int, ...] = ()  # layer indices forced dense (Qwen's mlp_only_layers)
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek-V3) instead of GQA

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if isinstance(self.mla, dict):
            object.__setattr__(self, "mla", MLAConfig.from_dict(self.mla))
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers={self.dense_layers} must hold layer indices in [0, {self.n_layers})")
        if self.qk_norm_scope not in ("head", "full"):
            raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r} is unknown; choose 'head' or 'full'")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv={self.clip_qkv!r} must be > 0 (or None)")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.first_dense_layers < 0:
            raise ValueError(f"first_dense_layers={self.first_dense_layers} must be >= 0")
        if self.moe.d_model != self.d_model:
            raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
        if self.mla is not None:
            return  # MLA has its own head dims, validated by MLAConfig
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set head_dim)")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.hd % 2:
            raise ValueError(f"head_dim={self.hd} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the head dim, or MLA's qk_rope_head_dim."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.hd

    @property
    def dense_hidden(self) -> int:
        return self.dense_d_hidden or self.moe.top_k * self.moe.d_hidden

    def is_moe_layer(self, i: int) -> bool:
        return (not self.dense and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0
                and i not in self.dense_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "moekit"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k != "model_type"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); the model config is damaged") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


class ModelOutput:
    """``logits`` (B, S, V); ``loss``, the LM loss (mean over non-ignored targets) when labels were given;
    ``aux_loss``, the sum over MoE layers of their balancing terms; ``stats``, layer index ->
    :class:`MoEStats`; ``kv_cache``. ``aux_loss`` and ``stats`` are computed from the layers' outputs on
    first access (see :class:`MoEOutput`), so generation does not pay for them."""

    __slots__ = ("logits", "loss", "kv_cache", "_moe", "_aux_loss", "_stats", "_grad")

    def __init__(self, logits: Tensor, loss: Tensor | None, moe_outputs: dict[int, MoEOutput],
                 kv_cache: KVCache | None = None):
        self.logits, self.loss, self.kv_cache = logits, loss, kv_cache
        self._moe = moe_outputs
        self._aux_loss: Tensor | None = None
        self._stats: dict[int, MoEStats] | None = None
        self._grad = torch.is_grad_enabled()  # the forward's grad mode, restored whenever aux is summed

    @property
    def aux_loss(self) -> Tensor:
        if self._aux_loss is None:
            with torch.set_grad_enabled(self._grad):
                aux = self.logits.new_zeros((), dtype=torch.float32)
                for out in self._moe.values():
                    aux = aux + out.aux_loss
            self._aux_loss = aux
        return self._aux_loss

    @property
    def stats(self) -> dict[int, MoEStats]:
        if self._stats is None:
            self._stats = {i: out.stats for i, out in self._moe.items()}
        return self._stats


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.mla is not None:
            self.attn = MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla)
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, bias=cfg.attn_bias,
                                  qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, out_bias=cfg.attn_out_bias,
                                  qk_norm_scope=cfg.qk_norm_scope, clip_qkv=cfg.clip_qkv)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(idx)
        self.ffn = MoELayer(cfg.moe) if self.is_moe else MLP(cfg.d_model, cfg.dense_hidden, "swiglu")

    def forward(self, x, cos, sin, mask, token_mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, self.idx)
        h = self.ffn_norm(x)
        if self.is_moe:
            out = self.ffn(h, token_mask=token_mask)
            return x + out.output, out
        return x + self.ffn(h), None


class MoETransformer(nn.Module):
    """Decoder-only language model whose feed-forward blocks are MoE layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter.

        | parameter                               | init                              |
        |-----------------------------------------|-----------------------------------|
        | embed, lm_head, q/k/v, gate/up, router  | N(0, init_std)                    |
        | o_proj, w_down, down_proj (residual out)| N(0, init_std / sqrt(2 n_layers)) |
        | norms                                   | 1; biases 0                       |
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "o_proj" in name or "w_down" in name or "down_proj" in name:
                nn.init.normal_(p, std=out_std)
            elif "w_noise" in name:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, MoELayer) and m.router.expert_bias is not None:
                m.router.expert_bias.zero_()

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: KVCache | None = None) -> ModelOutput:
        """input_ids: (B, S) int64. labels: (B, S) targets aligned with the positions (the *next* token of
        each position; -100 = ignore). attention_mask: (B, S), 0 = padding (not attended, not routed,
        not in any loss). kv_cache: pass a ``KVCache`` to decode incrementally."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + S > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + S} exceeds max_seq_len={self.config.max_seq_len}")
        dev = input_ids.device
        x = self.embed(input_ids)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            if kv_cache is not None:
                key_mask = key_mask if kv_cache.mask is None else torch.cat([kv_cache.mask, key_mask], dim=1)
                kv_cache.mask = key_mask
        elif kv_cache is not None and kv_cache.mask is not None:
            key_mask = torch.cat([kv_cache.mask, torch.ones(B, S, dtype=torch.bool, device=dev)], dim=1)
            kv_cache.mask = key_mask
        if key_mask is not None:
            # positions count real tokens only, so left padding does not shift RoPE
            positions = (key_mask.long().cumsum(1) - 1).clamp_min(0)[:, past:]
        else:
            positions = torch.arange(past, past + S, device=dev).unsqueeze(0).expand(B, S)
        cos, sin = rope_cos_sin(positions, self.config.rope_dim, self.config.rope_theta, x.dtype)
        mask = build_attn_mask(key_mask, S, past + S, dev) if (key_mask is not None or past > 0) else None
        token_mask = attention_mask.bool() if attention_mask is not None else None
        moe_outputs: dict[int, MoEOutput] = {}
        for block in self.layers:
            x, moe_out = block(x, cos, sin, mask, token_mask, kv_cache)
            if moe_out is not None:
                moe_outputs[block.idx] = moe_out
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.bool(), -100)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        out = ModelOutput(logits, loss, moe_outputs, kv_cache)
        if torch.compiler.is_compiling():
            out.aux_loss, out.stats  # noqa: B018 - in the graph, not after it
        return out

    def num_params(self) -> dict[str, int]:
        """Total parameters and active parameters per token (embedding and head counted; once if tied)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.moe_layers():
            per_expert = sum(w[0].numel() for w in (m.experts.w_gate, m.experts.w_up, m.experts.w_down) if w is not None)
            E, k = m.cfg.num_experts, m.cfg.top_k
            active_experts = E if m.cfg.router == "dense" else k
            inactive += (E - active_experts) * per_expert
        active = total - inactive  # tied embeddings are one parameter, so counted once
        return {"total_params": total, "active_params": active}
