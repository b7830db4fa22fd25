"""Routers that balance by construction (Sinkhorn / S-BASE, BASE layers) or by a fixed table (hash
layers), as pure functions.

Legend: T tokens, E experts, K top-k, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from moekit.functional.routing import Routing

__all__ = [
    "BalancedAssignmentError",
    "SinkhornError",
    "balanced_assignment",
    "balanced_hash_table",
    "base_route",
    "hash_route",
    "hash_table",
    "host_steps",
    "sinkhorn_log",
    "sinkhorn_route",
]

# the host-side steps run behind torch.compiler.disable (one graph break each under torch.compile). The
# decorator imports torch._dynamo (~1.2 s), so it is applied when a router that needs it is built
# (host_steps()), not at import: every `moekit` command paid it at start-up (`moekit --help` 3.8 -> 1.8 s)
_HOST_STEPS: dict[str, Callable[..., Tensor]] = {}


class SinkhornError(RuntimeError):
    """Sinkhorn iterations produced NaN/inf or did not reach the tolerance within the iteration cap."""


class BalancedAssignmentError(ValueError):
    """A balanced assignment is impossible: the token count is not a multiple of the expert count."""


def sinkhorn_log(logits_TE: Tensor, *, max_iter: int = 1000, tol: float = 1e-4) -> Tensor:
    """Sinkhorn(exp(l)) in the log domain: log Q = l + f_T + g_E with the rows of Q summing to 1/T and
    its columns to 1/E. Alternates exact column and row normalisations and stops when every column sum
    is within relative ``tol`` of 1/E (the rows are then exact). Returns log Q; raises
    :class:`SinkhornError` on NaN/inf or after ``max_iter`` iterations without convergence."""
    T, E = logits_TE.shape
    if not torch.isfinite(logits_TE).all():
        raise SinkhornError("sinkhorn: the router logits contain NaN or inf")
    log_r, log_c = -torch.log(torch.tensor(float(T), dtype=logits_TE.dtype)), -torch.log(
        torch.tensor(float(E), dtype=logits_TE.dtype))
    f_T1 = logits_TE.new_zeros(T, 1)
    g_1E = logits_TE.new_zeros(1, E)
    for _ in range(max_iter):
        f_T1 = log_r - torch.logsumexp(logits_TE + g_1E, dim=1, keepdim=True)  # rows exact
        col_E = torch.logsumexp(logits_TE + f_T1, dim=0, keepdim=True)
        err = (torch.exp(col_E + g_1E - log_c) - 1).abs().max()
        if not torch.isfinite(err):
            raise SinkhornError("sinkhorn: the scaling became NaN or inf")
        if err <= tol:
            return logits_TE + f_T1 + g_1E
        g_1E = log_c - col_E  # columns exact
    raise SinkhornError(f"sinkhorn did not converge to sinkhorn_tol={tol} within sinkhorn_max_iter={max_iter} "
                        f"iterations (last column error {float(err):.3g}); raise the cap or the tolerance")


# the convergence test is a host decision per iteration: one graph break, not one each
@torch.no_grad()
def _sinkhorn_topk(logits_TE: Tensor, k: int, max_iter: int, tol: float) -> Tensor:
    return sinkhorn_log(logits_TE, max_iter=max_iter, tol=tol).topk(k, dim=-1).indices


def sinkhorn_route(logits_TE: Tensor, k: int, *, training: bool, max_iter: int = 1000,
                   tol: float = 1e-4) -> Routing:
    """S-BASE (Clark et al. 2022; Megatron-Core's ``sinkhorn``): in training, the experts are the top-k of
    Sinkhorn(exp(l)) (computed without gradient); in eval, the top-k of the activation. Weights are the
    activation at the chosen experts: sigmoid(l) for k = 1, softmax(l) for k > 1 (not renormalised)."""
    act_TE = logits_TE.sigmoid() if k == 1 else logits_TE.softmax(dim=-1)
    if training:
        indices_TK = _host_step("sinkhorn_topk")(logits_TE.detach(), k, max_iter, tol)
    else:
        indices_TK = act_TE.topk(k, dim=-1).indices
    return Routing(logits_TE, logits_TE.softmax(dim=-1), indices_TK, act_TE.gather(1, indices_TK))


def balanced_assignment(affinity_TE: np.ndarray) -> np.ndarray:
    """(T,) expert of each token: every expert takes exactly T/E tokens and sum_t a[t, e(t)] is maximal.

    Exact, by successive shortest augmenting paths (the Hungarian method one token at a time): the
    tokens placed so far are always optimally assigned; a new token enters along the cheapest chain
    "t joins e1, a token of e1 moves to e2, ..., ending at an expert with a free slot". The chain
    runs over the E experts only (Bellman-Ford), an edge e1 -> e2 costing the least affinity any
    token of e1 loses by moving to e2. O(T^2 E) operations; float64 throughout."""
    a = np.asarray(affinity_TE, dtype=np.float64)
    T, E = a.shape
    if T % E:
        raise BalancedAssignmentError(f"a balanced assignment needs the token count T={T} to be a multiple "
                                      f"of num_experts={E} (each expert takes T/E tokens)")
    cap = T // E
    assign = np.full(T, -1, dtype=np.int64)
    load = np.zeros(E, dtype=np.int64)
    W, W_tok = np.full((E, E), np.inf), np.zeros((E, E), dtype=np.int64)
    for t in range(T):
        full = load >= cap
        # 1. transfer edges out of the full experts (moving out of a non-full one never helps)
        W.fill(np.inf)
        for e1 in np.flatnonzero(full):
            members = np.flatnonzero(assign == e1)
            loss_mE = a[members, e1][:, None] - a[members]
            W[e1], W_tok[e1] = loss_mE.min(0), members[loss_mE.argmin(0)]
        # 2. Bellman-Ford from t over the experts; no negative cycle, so at most E rounds
        dist, pred = -a[t].copy(), np.full(E, -1, dtype=np.int64)
        for _ in range(E):
            via_EE = dist[:, None] + W
            best, arg = via_EE.min(0), via_EE.argmin(0)
            better = best < dist - 1e-12 * (1 + np.abs(dist))
            if not better.any():
                break
            dist, pred = np.where(better, best, dist), np.where(better, arg, pred)
        # 3. the cheapest expert with a free slot ends the chain; walk it back
        end = int(np.flatnonzero(~full)[dist[~full].argmin()])
        e = end
        for _ in range(E):
            if pred[e] < 0:
                break
            assign[W_tok[pred[e], e]] = e
            e = int(pred[e])
        assign[t] = e
        load[end] += 1
    return assign


# solved on the host in numpy: one graph break
def _balanced_indices(affinity_TE: Tensor) -> Tensor:
    expert_T = balanced_assignment(affinity_TE.to("cpu", torch.float64).numpy())
    return torch.from_numpy(expert_T).to(affinity_TE.device).unsqueeze(1)


def base_route(logits_TE: Tensor, *, training: bool) -> Routing:
    """BASE layers (Lewis et al. 2021): in training, the exact balanced assignment maximising the total
    affinity l (which carries no gradient); in eval, greedy top-1. Weight = sigmoid(l) at the choice."""
    if training:
        indices_T1 = _host_step("balanced_indices")(logits_TE.detach())
    else:
        indices_T1 = logits_TE.argmax(dim=-1, keepdim=True)
    return Routing(logits_TE, logits_TE.softmax(dim=-1), indices_T1, logits_TE.gather(1, indices_T1).sigmoid())


def host_steps() -> None:
    """Put the host-side steps of the sinkhorn and base routers behind ``torch.compiler.disable`` (once;
    their routers call it when built). Until then they are still disabled at their first call, but a first
    call inside a graph being traced would cost extra graph breaks there."""
    if not _HOST_STEPS:
        _HOST_STEPS.update(sinkhorn_topk=torch.compiler.disable(_sinkhorn_topk),
                           balanced_indices=torch.compiler.disable(_balanced_indices))


def _host_step(name: str) -> Callable[..., Tensor]:
    if not _HOST_STEPS:
        host_steps()
    return _HOST_STEPS[name]


def hash_table(vocab_size: int, num_experts: int, seed: int) -> Tensor:
    """(V,) int64: a uniform random expert per token id, from ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(num_experts, (vocab_size,), generator=g)


def balanced_hash_table(token_counts_V: Tensor, num_experts: int) -> Tensor:
    """(V,) int64: token ids by descending frequency, each to the expert with the least load so far
    (longest-processing-time greedy), so expert loads on the counted data are balanced; ties by id."""
    counts = token_counts_V.to(torch.int64).tolist()
    order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    load = [0] * num_experts
    table = [0] * len(counts)
    for v in order:
        e = min(range(num_experts), key=lambda j: (load[j], j))
        table[v] = e
        load[e] += counts[v]
    return torch.tensor(table, dtype=torch.int64)


def hash_route(token_ids_T: Tensor, table_V: Tensor, num_experts: int, logits_TE: Tensor) -> Routing:
    """Hash layers (Roller et al. 2021): expert = table[token id], top-1, weight 1, no router gradient.
    ``logits_TE`` are zeros that carry the input's NaNs (so a NaN token still shows)."""
    indices_T1 = table_V.to(token_ids_T.device)[token_ids_T].unsqueeze(1)
    weights_T1 = torch.ones(indices_T1.shape, dtype=logits_TE.dtype, device=logits_TE.device)
    return Routing(logits_TE, torch.full_like(logits_TE, 1.0 / num_experts), indices_T1, weights_T1)
