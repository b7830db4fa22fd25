"""MoELayer: router + dispatcher + grouped experts (+ shared experts), the drop-in FFN replacement.

Legend: T tokens (all leading dims flattened), n routed (non-padding) tokens, D model dim,
E experts, K top-k, A assignments.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.functional import losses as L
from moekit.functional import routing as R
from moekit.functional.dispatch import sort_by_expert
from moekit.nn.experts import MLP, GroupedExperts
from moekit.nn.router import Router

__all__ = ["MoELayer", "MoEOutput", "MoEStats", "SharedExperts"]


@dataclass
class MoEStats:
    """Routing statistics of one call, detached; padding tokens are not counted anywhere."""

    tokens_per_expert: Tensor  # (E,) assignments computed by each expert (after drops)
    dropped: Tensor  # () assignments dropped by the capacity limit
    num_assignments: Tensor  # () assignments before drops
    num_tokens: int  # routed (non-padding) tokens (a 0-d tensor inside a torch.compile'd graph with a mask)
    balance_loss: Tensor
    z_loss: Tensor
    importance_loss: Tensor
    router_entropy: Tensor  # mean over tokens of the entropy of p (nats)

    @property
    def drop_rate(self) -> Tensor:
        return self.dropped / self.num_assignments.clamp_min(1)

    def to_dict(self) -> dict:
        """Plain Python numbers for logging (syncs: call outside the hot path)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        out["drop_rate"] = float(self.drop_rate)
        return out


class MoEOutput:
    """``output`` (same shape and dtype as the input); ``aux_loss``, the weighted sum of the balancing
    terms the caller adds to its loss; ``stats``, a :class:`MoEStats`.

    Eagerly, ``aux_loss`` and ``stats`` are computed on first access, in the grad mode of the forward
    call: a decode step that never reads them skips ~30 small ops (measured ~0.5 ms per layer call at
    bench shape "decode", where the weights stream through the caches between calls). Under
    ``torch.compile`` they are computed in the graph.
    """

    __slots__ = ("output", "_aux_loss", "_stats", "_compute")

    def __init__(self, output: Tensor, aux_loss: Tensor | None = None, stats: MoEStats | None = None, *,
                 compute: Callable[[], tuple[Tensor, MoEStats]] | None = None):
        if compute is None and (aux_loss is None or stats is None):
            raise ValueError("MoEOutput needs aux_loss and stats, or a compute() that returns them")
        self.output = output
        self._aux_loss, self._stats, self._compute = aux_loss, stats, compute

    def _materialize(self) -> None:
        if self._compute is not None:
            self._aux_loss, self._stats = self._compute()
            self._compute = None

    @property
    def aux_loss(self) -> Tensor:
        self._materialize()
        return self._aux_loss

    @property
    def stats(self) -> MoEStats:
        self._materialize()
        return self._stats

    def __repr__(self) -> str:
        return f"MoEOutput(output={tuple(self.output.shape)}, aux_loss={self.aux_loss!r}, stats={self.stats!r})"


class SharedExperts(nn.Module):
    """Dense MLP every token passes through (DeepSeekMoE, Qwen2-MoE), optionally sigmoid-gated per token."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.mlp = MLP(cfg.d_model, cfg.shared_hidden_total, cfg.activation)
        self.gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = self.mlp(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer.

    ``layer(x, token_mask=None) -> MoEOutput``; x: (..., D). With a (B, S, D) input and
    ``cfg.seq_aux`` the balance term is computed per sequence (DeepSeek-V3).
    """

    def __init__(self, cfg: MoEConfig, ep_group=None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_hidden, cfg.activation, cfg.expert_impl)
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        # expert parallelism (issue 7): None = every expert here. With an ep_group, moekit.parallel keeps
        # this rank's E/W experts and sets an all-to-all dispatcher (moekit.parallel.apply_expert_parallel
        # does the same to a built model). Imported lazily: nn never imports parallel at module level.
        self.dispatcher = None
        if ep_group is not None:
            from moekit.parallel.dispatcher import shard_moe_layer

            shard_moe_layer(self, ep_group)

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Initialise every parameter.

        | parameter                      | init                         |
        |--------------------------------|------------------------------|
        | router.weight                  | N(0, std)                    |
        | router.w_noise (noisy_topk)    | 0 (noise starts at softplus(0)) |
        | router.expert_bias (buffer)    | 0                            |
        | experts.w_gate, experts.w_up   | N(0, std)                    |
        | experts.w_down                 | N(0, out_std or std)         |
        | shared_experts.*               | N(0, std); down_proj out_std |
        """
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std if out_std is not None else std)
        if self.shared_experts is not None:
            for name, p in self.shared_experts.named_parameters():
                nn.init.normal_(p, std=(out_std or std) if "down_proj" in name else std)

    # -- validation ---------------------------------------------------------------------------------
    def _check(self, x: Tensor, token_mask: Tensor | None) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"MoELayer input must be a floating tensor, got dtype={x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoELayer input last dim must be d_model={self.cfg.d_model}, got shape {tuple(x.shape)}"
            )
        if token_mask is not None and tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"token_mask shape {tuple(token_mask.shape)} must equal x.shape[:-1]={tuple(x.shape[:-1])}"
            )

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        self._check(x, token_mask)
        cfg = self.cfg
        E, D = cfg.num_experts, cfg.d_model
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        seq_ids_T = None
        if x.dim() == 3 and cfg.seq_aux:
            B, S = x.shape[:2]
            seq_ids_T = torch.arange(B, device=x.device).repeat_interleave(S)
        # 1. padding is neither routed to an expert, nor computed, nor counted. Token-choice and dense
        #    routers keep static shapes: padding rows are zeroed (finite, whatever they held), routed,
        #    and masked out of the assignments, losses and stats. Padding is removed by index instead
        #    where the count of real tokens matters: expert choice sizes each expert's pick by it, and a
        #    training router that draws noise/jitter draws it for the real tokens only.
        mask_T = valid_n = None
        random_router = self.training and (cfg.router == "noisy_topk" or cfg.router_jitter > 0)
        if token_mask is not None and cfg.router != "expert_choice" and not random_router:
            mask_T = token_mask.reshape(-1).to(torch.bool)
            x_nD = torch.where(mask_T.unsqueeze(1), x_TD, 0)
            n = mask_T.sum()
        elif token_mask is not None:
            valid_n = token_mask.reshape(-1).to(torch.bool).nonzero().squeeze(1)
            x_nD = x_TD.index_select(0, valid_n)
            if seq_ids_T is not None:
                seq_ids_T = seq_ids_T[valid_n]
            n = x_nD.shape[0]
        else:
            x_nD = x_TD
            n = T
        # 2. route in fp32
        routing = self.router(x_nD)
        a = R.assignments(routing)
        valid_A = None if mask_T is None else mask_T[a.token_A]
        num_assign = a.token_A.numel() if valid_A is None else valid_A.sum()
        # 3. capacity: drop assignments beyond each expert's C slots
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        keep_A = valid_A
        if cfg.capacity_factor is not None and cfg.is_token_choice and (mask_T is not None or n > 0):
            cap = R.capacity(n, E, cfg.top_k, cfg.capacity_factor)
            keep_A = R.apply_capacity(a, E, x_nD.shape[0], cap, cfg.drop_policy, valid_A)
            dropped = (~keep_A).sum() if valid_A is None else (valid_A & ~keep_A).sum()
        # 4. group by expert, run experts, weighted combine
        if self.dispatcher is None:
            # one op with static shapes: a dropped assignment is marked by expert id E, the sort and
            # the per-expert counts happen inside (torch.compile traces the layer without breaks)
            expert_A = a.expert_A if keep_A is None else a.expert_A.masked_fill(~keep_A, E)
            counts_E = None  # only the stats need them: counted when those are read
            y_nD = self.experts.combine(x_nD, a.token_A, expert_A, a.weight_A)
        else:  # expert parallel: each expert's run goes to its rank and back (moekit.parallel.dispatcher)
            if keep_A is not None:
                a = a.select(keep_A)
            d = sort_by_expert(a.token_A, a.expert_A, a.weight_A, E)
            expert_A, counts_E = a.expert_A, d.counts_E
            y_nD = self.dispatcher(x_nD, d, self.experts)
        if self.shared_experts is not None:
            y_nD = y_nD + self.shared_experts(x_nD)
        # a NaN/inf token must not vanish silently (e.g. dropped or untaken): propagate it
        y_nD = y_nD + (routing.logits_TE.sum(dim=-1, keepdim=True) * 0).to(y_nD.dtype)
        # 5. padding outputs are exactly 0
        if valid_n is not None:
            y_TD = torch.zeros_like(x_TD).index_copy(0, valid_n, y_nD)
        elif mask_T is not None:
            y_TD = torch.where(mask_T.unsqueeze(1), y_nD, 0)
        else:
            y_TD = y_nD
        num_seqs = x.shape[0] if seq_ids_T is not None else 1
        grad = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()

        def losses_and_stats() -> tuple[Tensor, MoEStats]:
            with torch.set_grad_enabled(grad):  # whenever it is read: the forward's grad mode
                counts = R.expert_counts(expert_A, E) if counts_E is None else counts_E
                # an int eagerly (stats are read outside the hot path); a tensor inside a compiled graph
                n_tokens = n if (compiling or not isinstance(n, Tensor)) else int(n)
                return self._losses(routing, counts, dropped, num_assign, n_tokens, seq_ids_T, num_seqs, mask_T,
                                    valid_A)

        if compiling:
            return MoEOutput(y_TD.reshape(x.shape), *losses_and_stats())
        return MoEOutput(y_TD.reshape(x.shape), compute=losses_and_stats)

    def _losses(self, routing: R.Routing, counts_E: Tensor, dropped: Tensor, num_assign: int | Tensor,
                n: int | Tensor, seq_ids_T: Tensor | None, num_seqs: int, mask_T: Tensor | None,
                valid_A: Tensor | None) -> tuple[Tensor, MoEStats]:
        """Balancing terms and stats over the real tokens: all rows, or the rows where ``mask_T``
        (``valid_A``: the same per assignment, in :func:`R.assignments` order)."""
        cfg = self.cfg
        E = cfg.num_experts
        logits_TE, probs_TE = routing.logits_TE, routing.probs_TE
        zero = logits_TE.new_zeros(())
        any_tokens = mask_T is not None or n > 0  # a masked count is a tensor: its terms handle n = 0
        if routing.indices_TK is not None and any_tokens:
            if seq_ids_T is not None:
                balance = L.sequence_balancing_loss(probs_TE, routing.indices_TK, seq_ids_T, num_seqs, E, mask_T)
            else:
                balance = L.load_balancing_loss(probs_TE, routing.indices_TK, E, mask_T)
        else:
            balance = zero  # expert choice and dense are balanced by construction
        z = L.z_loss(logits_TE, mask_T)
        if any_tokens:  # per-expert gate sums, straight from the assignments (no (T, E) gate matrix)
            if routing.indices_TK is not None:
                expert_A, weight_A = routing.indices_TK.reshape(-1), routing.weights_TK.reshape(-1)
            else:
                expert_A, weight_A = routing.expert_A, routing.weight_A
            weight_A = weight_A.to(probs_TE.dtype)
            if valid_A is not None:
                weight_A = torch.where(valid_A, weight_A, 0)
            importance = L.cv_squared(probs_TE.new_zeros(E).index_add(0, expert_A, weight_A))
        else:
            importance = zero
        aux = zero
        for coef, term in ((cfg.aux_loss_coef, balance), (cfg.z_loss_coef, z), (cfg.importance_loss_coef, importance)):
            if coef:
                aux = aux + coef * term
        with torch.no_grad():
            # for sigmoid_bias this is the entropy of the normalised scores s / sum(s)
            entropy_T = torch.special.entr(probs_TE).sum(-1)
            if mask_T is not None:
                entropy = torch.where(mask_T, entropy_T, 0).sum() / mask_T.sum().clamp_min(1)
            else:
                entropy = entropy_T.mean() if n > 0 else zero
        stats = MoEStats(
            tokens_per_expert=counts_E.detach(),
            dropped=dropped.detach(),
            num_assignments=torch.as_tensor(num_assign, device=counts_E.device),
            num_tokens=n,
            balance_loss=balance.detach(),
            z_loss=z.detach(),
            importance_loss=importance.detach(),
            router_entropy=entropy,
        )
        return aux, stats

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Tensor) -> None:
        """Aux-loss-free balancing step: bias_e += bias_update_rate * sign(mean_load - load_e)."""
        if self.router.expert_bias is None:
            raise ValueError(
                f"update_expert_bias needs router='sigmoid_bias' (this layer has router={self.cfg.router!r})"
            )
        b = self.router.expert_bias
        b.copy_(L.expert_bias_update(b, tokens_per_expert.to(b.device), self.cfg.bias_update_rate))
