"""Decoder-only MoE Transformer LM (Mixtral-style): embed -> N x (norm, attention, norm, FFN) -> norm -> head.

Legend: B batch, S sequence, D model dim, V vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.functional.routing_balanced import balanced_hash_table
from moekit.functional.routing_dynamic import relu_l1_update
from moekit.nn.attention import Attention, KVCache, RMSNorm, build_attn_mask
from moekit.nn.experts import MLP
from moekit.nn.init import init_weights_
from moekit.nn.linear import Linear
from moekit.nn.mla import MultiHeadLatentAttention
from moekit.nn.moa import MixtureOfAttention
from moekit.nn.moe import MoELayer, MoEOutput, MoEStats
from moekit.nn.rope import rope_tables
from moekit.ops.gemv import linear

__all__ = ["MoETransformer", "ModelOutput", "KVCache"]


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


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm, or (``norm_type="layer"`` / ``"layer_bias"``) a LayerNorm with a weight, without / with a bias."""
    if cfg.norm_type != "rms":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_type == "layer_bias")
    return RMSNorm(cfg.d_model, cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.attn_norm = make_norm(cfg)
        if cfg.mla is not None:
            self.attn = MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla)
        elif cfg.attn_experts:
            self.attn = MixtureOfAttention(cfg.d_model, cfg.attn_experts, cfg.attn_top_k, cfg.kv_heads, cfg.hd)
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, bias=cfg.attn_bias,
                                  qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, out_bias=cfg.attn_out_bias,
                                  qk_norm_scope=cfg.qk_norm_scope, clip_qkv=cfg.clip_qkv,
                                  sinks=cfg.attn_sinks, scale=cfg.attn_scale)
        self.window = cfg.window(idx)
        self.residual_scale = cfg.residual_scale
        self.ffn_norm = make_norm(cfg)
        self.is_moe = cfg.is_moe_layer(idx)
        self.ffn = MoELayer(cfg.moe) if self.is_moe else MLP(cfg.d_model, cfg.dense_hidden, "swiglu")

    def _res(self, y: Tensor) -> Tensor:
        return y if self.residual_scale == 1.0 else y * self.residual_scale

    def forward(self, x, cos, sin, mask, token_mask, cache, input_ids=None):
        x = x + self._res(self.attn(self.attn_norm(x), cos, sin, mask, cache, self.idx))
        h = self.ffn_norm(x)
        if self.is_moe:
            if getattr(self.ffn, "needs_token_ids", False):  # hash routing chooses by token id
                out = self.ffn(h, token_mask=token_mask, token_ids=input_ids)
            else:
                out = self.ffn(h, token_mask=token_mask)
            return x + self._res(out.output), out
        return x + self._res(self.ffn(h)), None


class MoETransformer(nn.Module):
    """Decoder-only language model whose feed-forward blocks are MoE layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size,
                                                                      bias=config.lm_head_bias)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter: :func:`moekit.nn.init.init_weights_` (its docstring tables the
        rules) with std = ``init_std`` and, for the residual outputs, ``init_std / sqrt(2 n_layers)``."""
        std = self.config.init_std
        init_weights_(self, std, std / math.sqrt(2 * self.config.n_layers))

    def new_kv_cache(self) -> KVCache:
        """An empty KV cache for this model: sliding-window layers keep only their window's keys."""
        return KVCache(self.config.n_layers, [b.window for b in self.layers], self.config.max_seq_len)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe]

    @torch.no_grad()
    def update_expert_biases(self, stats: dict[int, MoEStats]) -> None:
        """Aux-loss-free balancing (sigmoid_bias routers): one bias step per layer from its load in ``stats``
        (layer index -> MoEStats, as in :attr:`ModelOutput.stats`). Call after the optimizer step."""
        for block in self.layers:
            if block.is_moe and block.ffn.router.expert_bias is not None:
                block.ffn.update_expert_bias(stats[block.idx].tokens_per_expert, stats[block.idx].bias_target)

    @contextmanager
    def record_routing(self) -> Iterator[dict[int, list[Tensor]]]:
        """``with model.record_routing() as rec:`` -> ``rec[layer index]``, each MoE layer's record
        (:meth:`MoELayer.record_routing`)."""
        with ExitStack() as stack:
            yield {b.idx: stack.enter_context(b.ffn.record_routing()) for b in self.layers if b.is_moe}

    @contextmanager
    def global_balance(self, counts: dict[int, Tensor]) -> Iterator[None]:
        """``with model.global_balance({layer index: counts_E}):`` each MoE layer's balance loss takes its
        load fractions from the step's counts (:meth:`MoELayer.global_balance`)."""
        with ExitStack() as stack:
            for b in self.layers:
                if b.is_moe and b.idx in counts:
                    stack.enter_context(b.ffn.global_balance(counts[b.idx]))
            yield

    @contextmanager
    def replay_routing(self, record: dict[int, list[Tensor]]) -> Iterator[None]:
        """``with model.replay_routing(rec):`` every MoE layer replays its own record."""
        missing = [b.idx for b in self.layers if b.is_moe and b.idx not in record]
        if missing:
            raise ValueError(f"replay_routing: the record has no calls for MoE layer(s) {missing}")
        with ExitStack() as stack:
            for b in self.layers:
                if b.is_moe:
                    stack.enter_context(b.ffn.replay_routing(record[b.idx]))
            yield

    @torch.no_grad()
    def update_relu_l1(self, stats: dict[int, MoEStats]) -> None:
        """ReMoE's adaptive lambda (relu routers): one step for every relu layer, from the sparsity
        (inactive token-expert pairs) averaged over those layers in ``stats``, against the target
        1 - top_k / num_experts. Call once per optimizer step, like :meth:`update_expert_biases`."""
        layers = [b for b in self.layers if b.is_moe and getattr(b.ffn.router, "relu_l1", None) is not None]
        if not layers:
            return
        sparsity = sum(1 - float(stats[b.idx].experts_per_token) / b.ffn.cfg.num_experts for b in layers) / len(layers)
        for b in layers:
            cfg, l1 = b.ffn.cfg, b.ffn.router.relu_l1
            l1.copy_(relu_l1_update(l1, sparsity, 1 - cfg.top_k / cfg.num_experts, cfg.relu_l1_multiplier))

    def wants_balanced_hash(self) -> bool:
        """True when some layer is a hash router with ``hash_balanced`` (see :meth:`balance_hash_tables`)."""
        return any(m.cfg.router == "hash" and m.cfg.hash_balanced for m in self.moe_layers())

    @torch.no_grad()
    def balance_hash_tables(self, token_counts_V: Tensor) -> None:
        """hash_balanced: rebuild every such layer's token -> expert table so that tokens counted
        ``token_counts_V`` times (the training data) load the experts evenly."""
        for m in self.moe_layers():
            if m.cfg.router == "hash" and m.cfg.hash_balanced:
                m.router.hash_table.copy_(balanced_hash_table(token_counts_V, m.cfg.num_experts))

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, S) ids -> (B, S, D) input of the first block."""
        x = self.embed(input_ids)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def head(self, x_BSD: Tensor) -> Tensor:
        """The last block's output -> logits (B, S, V): final norm, the (tied or own) head, the divisor."""
        x = self.norm(x_BSD)
        logits = linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return logits / self.config.logits_divisor if self.config.logits_divisor != 1.0 else logits

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                kv_cache: KVCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids: (B, S) int64. labels: (B, S) targets aligned with the positions (the *next* token of
        each position; -100 = ignore). attention_mask: (B, S), 0 = padding (not attended, not routed,
        not in any loss). kv_cache: pass a ``KVCache`` to decode incrementally. logits_to_keep: n > 0
        projects only the last n positions onto the vocabulary (logits (B, n, V)): a prefill that samples
        from its last position skips (S - 1) x V of the head's work; 0 = every position."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep={logits_to_keep} must be >= 0, and 0 with labels (the loss "
                             "needs every position's logits)")
        B, S = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + S > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + S} exceeds max_seq_len={self.config.max_seq_len}")
        dev = input_ids.device
        x = self.embed_tokens(input_ids)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            if kv_cache is not None:
                if kv_cache.mask is None and past > 0:  # everything cached so far was real
                    kv_cache.mask = torch.ones(B, past, dtype=torch.bool, device=dev)
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
        cos, sin = (t.unsqueeze(1) for t in rope_tables(positions, self.config, x.dtype))  # (B, 1, S, d)
        # one mask per distinct window (None = the whole context)
        masks = {
            w: build_attn_mask(key_mask, S, past + S, dev, w) if (key_mask is not None or past > 0 or w) else None
            for w in {b.window for b in self.layers}
        }
        token_mask = attention_mask.bool() if attention_mask is not None else None
        moe_outputs: dict[int, MoEOutput] = {}
        for block in self.layers:
            x, moe_out = block(x, cos, sin, masks[block.window], token_mask, kv_cache, input_ids)
            if moe_out is not None:
                moe_outputs[block.idx] = moe_out
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.head(x)
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
        """Total parameters and active parameters per token (embedding and head counted; once if tied).

        Counts the whole model: the experts that an expert-parallel layer holds on other ranks too."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.moe_layers():
            per_expert = sum(w[0].numel() for w in (m.experts.w_gate, m.experts.w_up, m.experts.w_down) if w is not None)
            E, k = m.cfg.num_experts, m.cfg.active_k  # hierarchical: top_k in each of group_top_k groups
            total += (E - m.experts.num_experts) * per_expert  # held by other ranks
            active_experts = E if m.cfg.router == "dense" else k
            inactive += (E - active_experts) * per_expert
        active = total - inactive  # tied embeddings are one parameter, so counted once
        return {"total_params": total, "active_params": active}
