"""ModelConfig (the whole decoder-only LM) and MLAConfig (multi-head latent attention's shapes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from moekit.config.base import ConfigBase, setting
from moekit.config.moe import MoEConfig
from moekit.config.rope import RopeScaling

__all__ = ["QK_NORM_SCOPES", "MLAConfig", "ModelConfig"]

QK_NORM_SCOPES = ("head", "full")
NORM_TYPES = ("rms", "layer", "layer_bias")


@dataclass(frozen=True)
class MLAConfig(ConfigBase):
    """Shapes of multi-head latent attention; ``q_lora_rank=None`` projects q directly from x."""

    kind = "MLA"

    kv_lora_rank: int = setting(512, "rank of the cached key/value latent")
    qk_nope_head_dim: int = setting(128, "per-head q/k width without RoPE")
    qk_rope_head_dim: int = setting(64, "per-head q/k width with RoPE (one key shared by all heads)")
    v_head_dim: int = setting(128, "per-head value width")
    q_lora_rank: int | None = setting(1536, "rank of the query latent; none = q projected directly from x")
    softmax_scale: float | None = setting(None, "attention scale; none = (qk_nope_head_dim + "
                                          "qk_rope_head_dim) ** -0.5")
    latent_norm_eps: float = setting(1e-6, "eps of q_a_norm and kv_a_norm (DeepSeek keeps 1e-6 whatever "
                                     "rms_norm_eps is)")

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mla.{name}={v!r} must be an integer >= 1")
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            raise ValueError(f"mla.qk_nope_head_dim={self.qk_nope_head_dim!r} must be an integer >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"mla.q_lora_rank={self.q_lora_rank!r} must be an integer >= 1 or None")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"mla.softmax_scale={self.softmax_scale!r} must be > 0 (or None)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.qk_head_dim**-0.5


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Whole-model configuration; JSON round-trips through ``to_json``/``from_json``.

    ``to_dict`` adds ``"model_type": "moekit"`` (what tells a config.json of moekit's from an HF one);
    ``moe`` and ``mla`` may be given as dicts and become MoEConfig / MLAConfig.
    """

    kind = "model"

    vocab_size: int = setting(4096, "vocabulary size (embedding rows)")
    d_model: int = setting(128, "model width")
    n_layers: int = setting(4, "transformer blocks")
    n_heads: int = setting(4, "attention heads")
    n_kv_heads: int | None = setting(None, "key/value heads (grouped-query attention); none = n_heads")
    head_dim: int | None = setting(None, "width of each attention head; none = d_model // n_heads")
    max_seq_len: int = setting(2048, "longest sequence the model accepts", training_only=True)
    rope_theta: float = setting(10000.0, "RoPE base")
    norm_eps: float = setting(1e-6, "RMSNorm eps")
    tie_embeddings: bool = setting(True, "the output head shares the input embedding's weights")
    attn_bias: bool = setting(False, "biases on the q/k/v projections")
    qk_norm: bool = setting(False, "RMSNorm on queries and keys")
    # feed-forward: MoE everywhere unless dense; dense layers use a SwiGLU MLP of dense_d_hidden
    moe: MoEConfig = setting(  # noqa: RUF009 - setting() returns a dataclasses.field
        factory=lambda: MoEConfig(d_model=128, d_hidden=256), help="the MoE feed-forward blocks")
    dense: bool = setting(False, "every feed-forward block is a dense MLP (no MoE)")
    dense_d_hidden: int | None = setting(None, "hidden width of the dense MLPs; none = moe.top_k * "
                                         "moe.d_hidden (the same active width)")
    moe_every: int = setting(1, "layer i is MoE when (i + 1) % moe_every == 0 (and i >= first_dense_layers)")
    first_dense_layers: int = setting(0, "how many leading layers are dense")
    init_std: float = setting(0.02, "std of the normal weight init", training_only=True)
    # attention variants (checkpoint interop)
    attn_out_bias: bool = setting(False, "a bias on the attention output projection (o_proj)")
    qk_norm_scope: str = setting("head", "q/k norm per head (Qwen3) or over the whole projection (OLMoE)",
                                 choices=QK_NORM_SCOPES)
    clip_qkv: float | None = setting(None, "clamp q/k/v to [-clip_qkv, clip_qkv] (OLMoE); none = no clamp")
    dense_layers: tuple[int, ...] = setting((), "layer indices forced dense (Qwen's mlp_only_layers)")
    mla: MLAConfig | None = setting(  # noqa: RUF009 - setting() returns a dataclasses.field
        None, "multi-head latent attention (DeepSeek-V3) instead of GQA")
    rope_scaling: RopeScaling | None = setting(  # noqa: RUF009 - setting() returns a dataclasses.field
        None, "RoPE frequency scaling (yarn, linear, dynamic, llama3); none = plain RoPE")
    sliding_window: int | None = setting(None, "keys a query sees, itself included, in the sliding-window "
                                         "layers; none = the whole context")
    sliding_layers: tuple[int, ...] | None = setting(None, "layer indices with the sliding window; none = "
                                                     "every layer (when sliding_window is set)")
    attn_sinks: bool = setting(False, "a learned per-head logit in every softmax that takes probability "
                               "mass and contributes no value (gpt-oss)")
    # Granite's multipliers
    embed_scale: float = setting(1.0, "the input embeddings are multiplied by this")
    residual_scale: float = setting(1.0, "each attention and feed-forward output is multiplied by this "
                                    "before it joins the residual stream")
    attn_scale: float | None = setting(None, "the attention softmax scale; none = head_dim ** -0.5")
    logits_divisor: float = setting(1.0, "the output logits are divided by this")
    norm_type: str = setting("rms", "the block and final norms: RMSNorm, LayerNorm without bias (DBRX) or "
                             "with one (PhiMoE)", choices=NORM_TYPES)
    lm_head_bias: bool = setting(False, "a bias on the output head (PhiMoE); needs an untied head")
    attn_experts: int = setting(0, "mixture of attention heads (JetMoE): attention experts per layer, each "
                                "with its own q and o projections; 0 = plain attention")
    attn_top_k: int = setting(1, "attention experts per token (attn_experts > 0); n_heads must be "
                              "n_kv_heads * attn_top_k")

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if self.moe.router == "hash" and self.moe.hash_vocab_size is None:  # the table covers the vocabulary
            object.__setattr__(self, "moe", self.moe.replace(hash_vocab_size=self.vocab_size))
        if isinstance(self.mla, dict):
            object.__setattr__(self, "mla", MLAConfig.from_dict(self.mla))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        self._check_window()
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers={self.dense_layers} must hold layer indices in [0, {self.n_layers})")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type={self.norm_type!r} is unknown; choose one of {NORM_TYPES}")
        if self.attn_experts:
            self._check_moa()
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError("lm_head_bias=True needs tie_embeddings=False (a tied head has no bias of its own)")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
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

    def _check_window(self) -> None:
        w, layers = self.sliding_window, self.sliding_layers
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"sliding_window={w!r} must be an integer >= 1 (or None)")
        if layers is not None:
            object.__setattr__(self, "sliding_layers", tuple(layers))
            if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.sliding_layers):
                raise ValueError(f"sliding_layers={layers} must hold layer indices in [0, {self.n_layers})")
        if (w is not None or self.attn_sinks or self.attn_scale is not None) and self.mla is not None:
            raise ValueError("sliding_window / attn_sinks / attn_scale are not implemented for multi-head latent "
                             "attention (its scale is mla.softmax_scale)")
        for name in ("embed_scale", "residual_scale", "logits_divisor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ValueError(f"attn_scale={self.attn_scale!r} must be > 0 (or None)")

    def _check_moa(self) -> None:
        E, K = self.attn_experts, self.attn_top_k
        if not isinstance(E, int) or E < 0 or not isinstance(K, int) or not 1 <= K <= max(E, 1):
            raise ValueError(f"attn_top_k={K!r} must be in [1, attn_experts={E!r}]")
        if self.mla is not None or self.attn_sinks or self.sliding_window is not None or self.qk_norm:
            raise ValueError("attn_experts (mixture of attention) goes with plain attention only: no mla, "
                             "sinks, sliding window or q-k norm")
        if self.n_heads != self.kv_heads * K:
            raise ValueError(f"n_heads={self.n_heads} must be n_kv_heads * attn_top_k = {self.kv_heads * K} "
                             "with attn_experts")

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, or None where it attends to the whole context."""
        if self.sliding_window is None or (self.sliding_layers is not None and i not in self.sliding_layers):
            return None
        return self.sliding_window

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
        return super().to_dict() | {"model_type": "moekit"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return super().from_dict({k: v for k, v in d.items() if k != "model_type"})
