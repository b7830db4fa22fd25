"""MoELayer: router + dispatcher + grouped experts (+ shared experts), the drop-in FFN replacement.

Legend: T tokens (all leading dims flattened), n routed (non-padding) tokens, D model dim,
E experts, K top-k, A assignments.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.functional import routing as R
from moekit.functional.bias_update import bias_step
from moekit.functional.stats import MoEStats, RoutedCall, losses_and_stats
from moekit.nn.biased_experts import BiasedExperts
from moekit.nn.dispatch import Dispatcher, LocalDispatcher
from moekit.nn.experts import MLP, GroupedExperts
from moekit.nn.init import init_weights_
from moekit.nn.replay import RoutingReplay
from moekit.nn.router import Router
from moekit.nn.soft_moe import soft_moe_forward
from moekit.nn.zero_experts import ZeroComputeExperts

__all__ = ["MoELayer", "MoEOutput", "MoEStats", "SharedExperts", "expert_parallel_layers", "expert_parameter_ids"]


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


@dataclass
class _Rows:
    """The rows a call routes. Token-choice and dense routers keep static shapes: padding rows are
    zeroed (finite, whatever they held), routed, and masked out (``mask_T``). Where the count of real
    tokens matters, padding is removed by index instead (``index_n``): expert choice sizes each
    expert's pick by it, and a training router that draws noise or jitter draws it for real tokens only."""

    x_nD: Tensor
    num_tokens: int | Tensor  # real tokens (a tensor when masked in place)
    mask_T: Tensor | None = None
    index_n: Tensor | None = None
    seq_ids_T: Tensor | None = None

    def scatter(self, y_nD: Tensor, T: int) -> Tensor:
        """(T, D) outputs with exact zeros at the padding."""
        if self.index_n is not None:
            return y_nD.new_zeros(T, y_nD.shape[1]).index_copy(0, self.index_n, y_nD)
        if self.mask_T is not None:
            return torch.where(self.mask_T.unsqueeze(1), y_nD, 0)
        return y_nD


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer: router -> dispatcher -> experts (+ shared experts).

    ``layer(x, token_mask=None) -> MoEOutput``; x: (..., D). With a (B, S, D) input and
    ``cfg.seq_aux`` the balance term is computed per sequence (DeepSeek-V3). The dispatcher decides
    where the experts run (:class:`LocalDispatcher`: here); ``moekit.parallel.apply_expert_parallel``
    swaps in the all-to-all one on a built layer or model.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = (
            BiasedExperts(cfg.num_experts, cfg.d_model, cfg.d_hidden, bias=cfg.expert_ffn_bias,
                          swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
            if cfg.expert_ffn_bias or cfg.swiglu_limit is not None  # gpt-oss's experts
            else GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_hidden, cfg.activation, cfg.expert_impl)
        )
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        self.output_bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.output_bias else None  # JetMoE
        self.dispatcher: Dispatcher = LocalDispatcher()
        # copy / constant experts (null and zero experts compute nothing)
        zc = cfg.num_copy_experts + cfg.num_constant_experts
        self.zero_experts = ZeroComputeExperts(cfg) if zc else None
        self._replay = RoutingReplay(cfg.router)
        self._step_counts_E: Tensor | None = None  # see global_balance()
        self.init_weights()

    @property
    def expert_parallel(self) -> bool:
        return self.dispatcher.expert_parallel

    def init_weights(self, std: float | None = None, out_std: float | None = None) -> None:
        """Initialise every parameter by the rules of :func:`moekit.nn.init.init_weights_` (the same as
        inside an MoETransformer, which passes its ``init_std``)."""
        init_weights_(self, std, out_std)

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

    def _rows(self, x: Tensor, token_mask: Tensor | None) -> _Rows:
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        seq_ids_T = None
        if x.dim() == 3 and cfg.seq_aux:
            B, S = x.shape[:2]
            seq_ids_T = torch.arange(B, device=x.device).repeat_interleave(S)
        if token_mask is None:
            return _Rows(x_TD, x_TD.shape[0], seq_ids_T=seq_ids_T)
        mask_T = token_mask.reshape(-1).to(torch.bool)
        random_router = self.training and (cfg.router == "noisy_topk" or cfg.router_jitter > 0)
        # these size their choice by the real tokens: each expert's pick, or an exact balance in training
        exact = cfg.router == "expert_choice" or (self.training and cfg.router in ("base", "sinkhorn"))
        if not exact and not random_router:
            return _Rows(torch.where(mask_T.unsqueeze(1), x_TD, 0), mask_T.sum(), mask_T=mask_T, seq_ids_T=seq_ids_T)
        index_n = mask_T.nonzero().squeeze(1)
        return _Rows(x_TD.index_select(0, index_n), index_n.shape[0], index_n=index_n,
                     seq_ids_T=None if seq_ids_T is None else seq_ids_T[index_n])

    def _capacity(self, a: R.Assignments, rows: _Rows, valid_A: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(keep mask or None, assignments dropped; None = no limit, nothing dropped): each expert keeps at
        most C of its assignments."""
        cfg = self.cfg
        if cfg.capacity_factor is None or not cfg.is_token_choice or (rows.mask_T is None and rows.num_tokens == 0):
            return valid_A, None
        cap = R.capacity(rows.num_tokens, cfg.num_experts, cfg.active_k, cfg.capacity_factor)
        X = cfg.num_extra_experts
        keep_A = R.apply_capacity(a, cfg.num_experts + X, rows.x_nD.shape[0], cap, cfg.drop_policy, valid_A)
        if X:  # null / zero-computation experts have no slots to run out of
            extra_A = a.expert_A >= cfg.num_experts
            keep_A = keep_A | (extra_A if valid_A is None else extra_A & valid_A)
        dropped = (~keep_A).sum() if valid_A is None else (valid_A & ~keep_A).sum()
        return keep_A, dropped

    def forward(self, x: Tensor, token_mask: Tensor | None = None, *,
                generator: torch.Generator | None = None, token_ids: Tensor | None = None) -> MoEOutput:
        """``generator``: where a training router draws its noise / jitter (None = torch's global RNG).
        ``token_ids`` (x.shape[:-1], int64): the tokens' ids, needed by ``router="hash"`` only."""
        self._check(x, token_mask)
        if self.cfg.router == "soft":  # slots, not assignments
            return MoEOutput(*soft_moe_forward(self, x, token_mask))
        E = self.cfg.num_experts
        # 1. the rows to route: padding is neither routed to an expert, nor computed, nor counted
        rows = self._rows(x, token_mask)
        # 2. route in fp32
        picks_TK = self._replay.picks(rows.x_nD.shape[0], self.cfg.top_k)  # None unless replaying
        routing = self.router(rows.x_nD, generator, self._row_ids(token_ids, rows), picks_TK)
        self._replay.keep(routing)
        a = R.assignments(routing)
        valid_A = None if rows.mask_T is None else rows.mask_T[a.token_A]
        if routing.active_TK is not None:  # dynamic k: the inactive columns are not assignments
            active_A = routing.active_TK.reshape(-1)
            valid_A = active_A if valid_A is None else valid_A & active_A
        # 3. capacity: drop assignments beyond each expert's C slots (marked by expert id E)
        keep_A, dropped = self._capacity(a, rows, valid_A)
        expert_A = a.expert_A if keep_A is None else a.expert_A.masked_fill(~keep_A, E)
        if self.cfg.num_extra_experts:  # the routed experts never see the null / zero-computation ones
            expert_A = expert_A.clamp_max(E)
        # 4. the dispatcher runs the experts (here or on their ranks) and combines their outputs
        y_nD, counts_E = self.dispatcher(rows.x_nD, a.token_A, expert_A, a.weight_A, self.experts)
        if self.zero_experts is not None:
            y_nD = y_nD + self.zero_experts(rows.x_nD, a.token_A, a.expert_A, a.weight_A)
        if self.shared_experts is not None:
            y_nD = y_nD + self.shared_experts(rows.x_nD)
        if self.output_bias is not None:
            y_nD = y_nD + self.output_bias
        # a NaN/inf token must not vanish silently (dropped, untaken, or sent to an expert that computes
        # nothing): propagate it. Where every token reaches k experts, their outputs carry it already.
        if dropped is not None or routing.active_TK is not None or self.cfg.num_extra_experts \
                or routing.indices_TK is None:
            y_nD = y_nD + (routing.logits_TE.sum(dim=-1, keepdim=True) * 0).to(y_nD.dtype)
        # 5. padding outputs are exactly 0
        y = rows.scatter(y_nD, x.shape[:-1].numel()).reshape(x.shape)
        # 6. balancing terms and statistics, from what was routed
        grad, compiling = torch.is_grad_enabled(), torch.compiler.is_compiling()
        num_assign = a.token_A.numel() if valid_A is None else valid_A.sum()
        quantile = self.cfg.bias_update == "quantile" and self.router.expert_bias is not None
        bias_E = self.router.expert_bias.detach().clone() if quantile else None  # the bias this call used
        step_counts_E = self._step_counts_E  # balance_scope="global": set by global_balance() for this step

        def compute() -> tuple[Tensor, MoEStats]:
            with torch.set_grad_enabled(grad):  # whenever it is read: the forward's grad mode
                # an int eagerly (stats are read outside the hot path); a tensor inside a compiled graph
                n = rows.num_tokens
                drops = torch.zeros((), dtype=torch.long, device=x.device) if dropped is None else dropped
                call = RoutedCall(routing, R.expert_counts(expert_A, E) if counts_E is None else counts_E, drops,
                                  num_assign, n if (compiling or not isinstance(n, Tensor)) else int(n),
                                  rows.seq_ids_T, x.shape[0] if rows.seq_ids_T is not None else 1, rows.mask_T,
                                  valid_A, k_target=self.cfg.top_k, expert_bias=bias_E,
                                  extra_counts=self._extra_counts(a, valid_A), global_counts_E=step_counts_E)
                return losses_and_stats(call, self.cfg)

        if compiling:
            return MoEOutput(y, *compute())
        return MoEOutput(y, compute=compute)

    @contextmanager
    def global_balance(self, counts_E: Tensor) -> Iterator[None]:
        """Inside: the balance loss takes its load fractions from ``counts_E`` (the picks per expert,
        null / zero-computation ones included, of the whole optimizer step: every micro-batch and rank)
        instead of this forward's own (``balance_scope="global"``)."""
        self._step_counts_E = counts_E
        try:
            yield
        finally:
            self._step_counts_E = None

    @property
    def needs_token_ids(self) -> bool:
        """True when the router chooses by token id (``router="hash"``): pass ``token_ids=``."""
        return self.cfg.router == "hash"

    @staticmethod
    def _row_ids(token_ids: Tensor | None, rows: _Rows) -> Tensor | None:
        if token_ids is None:
            return None
        ids_T = token_ids.reshape(-1)
        return ids_T if rows.index_n is None else ids_T.index_select(0, rows.index_n)

    def _extra_counts(self, a: R.Assignments, valid_A: Tensor | None) -> Tensor | None:
        """(X,) assignments to each null / zero-computation expert (padding not counted), or None."""
        E, X = self.cfg.num_experts, self.cfg.num_extra_experts
        if not X:
            return None
        extra_A = a.expert_A >= E if valid_A is None else (a.expert_A >= E) & valid_A
        return R.expert_counts(torch.where(extra_A, a.expert_A - E, X), X)

    def record_routing(self):
        """``with layer.record_routing() as rec:`` appends each call's (T, K) chosen experts to the list
        ``rec`` (:mod:`moekit.nn.replay`)."""
        return self._replay.record()

    def replay_routing(self, record: list[Tensor]):
        """``with layer.replay_routing(rec):`` each call routes to the experts ``rec`` holds for it, in
        order, with weights from the current scores (the router still gets its gradient)."""
        return self._replay.replay(record)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Tensor, bias_target: Tensor | None = None) -> None:
        """Aux-loss-free balancing step under ``cfg.bias_update``: ``sign`` bias_e += bias_update_rate *
        sign(mean_load - load_e); ``sign_centered`` the same step minus its mean; ``quantile`` the
        call's ``MoEStats.bias_target`` (:mod:`moekit.functional.bias_update`)."""
        if self.router.expert_bias is None:
            raise ValueError(
                f"update_expert_bias needs router='sigmoid_bias' (this layer has router={self.cfg.router!r})"
            )
        b = self.router.expert_bias
        target = None if bias_target is None else bias_target.to(b.device)
        b.copy_(bias_step(self.cfg.bias_update, b, tokens_per_expert.to(b.device), self.cfg.bias_update_rate,
                          target))


def expert_parallel_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` whose experts are spread over processes, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.expert_parallel]


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every routed-expert parameter of the expert-parallel layers of ``model``."""
    return {id(p) for layer in expert_parallel_layers(model) for p in layer.experts.parameters()}
