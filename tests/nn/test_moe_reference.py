"""MoELayer against a naive float64 per-token loop written from the spec, not from the implementation.

Legend: T tokens (padding included), n routed tokens, D model dim, E experts, K top-k, H expert hidden.

The reference (``naive_moe``) works one token at a time with Python lists for every decision:
1. route the token (logits in float64, the spec's formula for each router);
2. apply capacity with an explicit per-expert list of kept slots;
3. sum the weighted expert outputs, each expert evaluated with its own weight matrices in float64;
4. recompute every statistic and loss from those lists.
It also returns the smallest score gap it met at a decision boundary, so a near tie (which the layer
may legitimately break the other way in fp32) shows up as a clear data problem, not a false bug.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from moekit import MoEConfig, MoELayer

D, H, HS = 12, 16, 8  # model dim, expert hidden, hidden per shared expert
B, S = 2, 11  # n = 22 tokens: capacity 0.75 * 22 * k / E never lands on an integer below
MIN_GAP = 1e-5  # smallest decision gap the fp32 layer must be able to resolve like float64

ROUTER_CFGS = {
    "topk": {"router": "topk", "num_experts": 4, "top_k": 2},
    "topk_raw": {"router": "topk", "num_experts": 4, "top_k": 2, "norm_topk": False},
    "switch": {"router": "switch", "num_experts": 4, "top_k": 1},
    "noisy_topk": {"router": "noisy_topk", "num_experts": 4, "top_k": 2},
    "sigmoid_bias": {"router": "sigmoid_bias", "num_experts": 4, "top_k": 2},
    "sigmoid_bias_g2": {"router": "sigmoid_bias", "num_experts": 6, "top_k": 2, "n_group": 2, "topk_group": 1,
                        "routed_scaling_factor": 2.5},
    "sigmoid_bias_g3_raw": {"router": "sigmoid_bias", "num_experts": 6, "top_k": 3, "n_group": 3,
                            "topk_group": 2, "norm_topk": False},
    "sigmoid_bias_g2_max": {"router": "sigmoid_bias", "num_experts": 8, "top_k": 3, "n_group": 4, "topk_group": 2,
                            "group_score": "max"},
    "sigmoid_bias_g2_sum3": {"router": "sigmoid_bias", "num_experts": 8, "top_k": 3, "n_group": 2,
                             "topk_group": 1},
    # options: null experts (AdaMoE), zero-computation experts (MoE++), DeepSeek-V2 device / comm losses
    "topk_null": {"router": "topk", "num_experts": 4, "top_k": 2, "num_null_experts": 2},
    "topk_zc": {"router": "topk", "num_experts": 4, "top_k": 2, "num_null_experts": 1, "num_zero_experts": 1,
                "num_copy_experts": 1, "num_constant_experts": 2},
    "topk_dev": {"router": "topk", "num_experts": 4, "top_k": 2, "num_devices": 2, "device_loss_coef": 0.3,
                 "comm_loss_coef": 0.2},
    "sigmoid_bias_dev": {"router": "sigmoid_bias", "num_experts": 6, "top_k": 2, "n_group": 3, "topk_group": 2,
                         "num_devices": 3, "device_loss_coef": 0.1, "comm_loss_coef": 0.2},
    "expert_choice": {"router": "expert_choice", "num_experts": 4, "top_k": 2},
    "dense": {"router": "dense", "num_experts": 4, "top_k": 2},
}
TOKEN_CHOICE_MODES = {
    "dropless": {},
    "position": {"capacity_factor": 0.75, "drop_policy": "position"},
    "probs": {"capacity_factor": 0.75, "drop_policy": "probs"},
}
TIGHT_CAPACITY = {"topk_null": 0.4, "topk_zc": 0.2}
OTHER_MODES = {"dropless": {}, "capacity": {"capacity_factor": 0.75}}
SHARED = {
    "noshared": {},
    "shared": {"num_shared_experts": 2, "shared_d_hidden": HS},
    "sharedgate": {"num_shared_experts": 2, "shared_d_hidden": HS, "shared_gate": True},
}
CASES = [
    (r, m)
    for r, kw in ROUTER_CFGS.items()
    for m in (OTHER_MODES if kw["router"] in ("expert_choice", "dense") else TOKEN_CHOICE_MODES)
]


def make_cfg(router: str, mode: str = "dropless", activation: str = "swiglu", shared: str = "noshared",
             impl: str = "fused", **extra) -> MoEConfig:
    modes = OTHER_MODES if ROUTER_CFGS[router]["router"] in ("expert_choice", "dense") else TOKEN_CHOICE_MODES
    kw = {"d_model": D, "d_hidden": H, "activation": activation, "expert_impl": impl,
          "importance_loss_coef": 0.05}
    kw.update(ROUTER_CFGS[router])
    kw.update(modes[mode])
    if mode != "dropless" and router in TIGHT_CAPACITY:  # the extra experts take many picks: drop some still
        kw["capacity_factor"] = TIGHT_CAPACITY[router]
    kw.update(SHARED[shared])
    kw.update(extra)
    return MoEConfig(**kw)


def randomize(layer: MoELayer, seed: int) -> MoELayer:
    """Weights big enough that routing is far from uniform; experts O(1); a bias that changes choices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if name.startswith("router.") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
        if layer.router.expert_bias is not None:
            b = layer.router.expert_bias
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.3)
    return layer


# -- the naive reference ----------------------------------------------------------------------------
def _act(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "swiglu":  # SiLU, the gate's activation
        return z / (1.0 + torch.exp(-z))
    if name == "gelu":  # exact (erf) GELU
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return torch.where(z > 0, z, torch.zeros_like(z))


def _expert(P: dict, cfg: MoEConfig, e: int, x: torch.Tensor) -> torch.Tensor:
    if cfg.activation == "swiglu":
        h = _act("swiglu", P["experts.w_gate"][e] @ x) * (P["experts.w_up"][e] @ x)
    else:
        h = _act(cfg.activation, P["experts.w_up"][e] @ x)
    return P["experts.w_down"][e] @ h


def _shared(P: dict, cfg: MoEConfig, x: torch.Tensor) -> torch.Tensor:
    if cfg.num_shared_experts == 0:
        return torch.zeros_like(x)
    pre = "shared_experts.mlp."
    if cfg.activation == "swiglu":
        h = _act("swiglu", P[pre + "gate_proj.weight"] @ x) * (P[pre + "up_proj.weight"] @ x)
    else:
        h = _act(cfg.activation, P[pre + "up_proj.weight"] @ x)
    y = P[pre + "down_proj.weight"] @ h
    if cfg.shared_gate:
        g = float(P["shared_experts.gate.weight"][0] @ x)
        y = y / (1.0 + math.exp(-g))
    return y


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    z = sum(ex)
    return [a / z for a in ex]


def _gap(a: float, b: float, relative: bool) -> float:
    """How far apart two ranked scores are: relative for probabilities (fp32 keeps their relative
    precision even when tiny), absolute for logits and biased sigmoid scores."""
    return (a - b) / max(abs(a), abs(b), 1e-300) if relative else a - b


def _top(scores: list[float], k: int, allowed=None, relative: bool = True) -> tuple[list[int], float]:
    """The k best indices in rank order, and the gap between the k-th and the (k+1)-th score."""
    cand = sorted(allowed if allowed is not None else range(len(scores)), key=lambda e: -scores[e])
    gap = _gap(scores[cand[k - 1]], scores[cand[k]], relative) if len(cand) > k else math.inf
    return cand[:k], gap


def _route_token(cfg: MoEConfig, logits: list[float], bias: list[float]):
    """-> (picks [(expert, weight)] in the router's rank order, balance-P vector, smallest gap)."""
    E, k = cfg.num_experts, cfg.top_k
    p = _softmax(logits)
    if cfg.router == "topk":  # p over E routed + the extra experts; a null pick weighs 0
        idx, gap = _top(p, k)
        w = [0.0 if _kind(cfg, e) == "null" else p[e] for e in idx]
        if cfg.norm_topk:
            w = [a / sum(w) if sum(w) > 0 else 0.0 for a in w]
        return list(zip(idx, w)), p, gap
    if cfg.router == "switch":
        idx, gap = _top(p, 1)
        return [(idx[0], p[idx[0]])], p, gap
    if cfg.router == "noisy_topk":  # eval mode: no noise, l' = l
        idx, gap = _top(logits, k, relative=False)
        return list(zip(idx, _softmax([logits[e] for e in idx]))), p, gap
    if cfg.router == "sigmoid_bias":
        s = [1.0 / (1.0 + math.exp(-a)) for a in logits]
        sb = [a + b for a, b in zip(s, bias)]
        allowed, ggap = None, math.inf
        if cfg.n_group > 1:
            gs = E // cfg.n_group
            # sum_top: the group's ceil(K/M) best (DeepSeek-V3); max: its best one (DeepSeek-V2)
            top = 1 if cfg.group_score == "max" else (cfg.group_score_top or -(-k // cfg.topk_group))
            group_score = [sum(sorted(sb[j * gs:(j + 1) * gs], reverse=True)[:top]) for j in range(cfg.n_group)]
            groups, ggap = _top(group_score, cfg.topk_group, relative=False)
            allowed = [e for j in groups for e in range(j * gs, (j + 1) * gs)]
        idx, gap = _top(sb, k, allowed, relative=False)
        w = [s[e] for e in idx]
        if cfg.norm_topk:
            w = [a / sum(w) for a in w]
        w = [a * cfg.routed_scaling_factor for a in w]
        return list(zip(idx, w)), [a / sum(s) for a in s], min(gap, ggap)
    if cfg.router == "dense":
        return list(enumerate(p)), p, math.inf
    raise AssertionError(cfg.router)


def _kind(cfg: MoEConfig, e: int) -> str:
    """Expert id -> "routed", or the kind of a null / zero-computation expert (ids from E, in this order)."""
    kinds = (["null"] * cfg.num_null_experts + ["zero"] * cfg.num_zero_experts + ["copy"] * cfg.num_copy_experts
             + ["constant"] * cfg.num_constant_experts)
    return "routed" if e < cfg.num_experts else kinds[e - cfg.num_experts]


def _extra_expert(P: dict, cfg: MoEConfig, e: int, x: torch.Tensor) -> torch.Tensor:
    kind = _kind(cfg, e)
    if kind == "copy":
        return x
    if kind == "constant":
        j = e - cfg.num_experts - cfg.num_null_experts - cfg.num_zero_experts - cfg.num_copy_experts
        a = _softmax((P["zero_experts.const_gate"][j] @ x).tolist())
        return a[0] * x + a[1] * P["zero_experts.const_vector"][j]
    return torch.zeros_like(x)  # null, zero


def _device_losses(cfg: MoEConfig, picks: list, Pvec: list) -> tuple[float, float]:
    """DeepSeek-V2: L_dev = sum_d mean_{j in d} f_j * sum_{j in d} P_j, L_comm = sum_d f''_d * sum_{j in d} P_j."""
    E, k, D, M = cfg.num_experts, cfg.top_k, cfg.num_devices, cfg.topk_group
    n, per = len(picks), cfg.num_experts // cfg.num_devices
    f = [E * sum(1 for pk in picks for e, _ in pk if e == j) / (k * n) for j in range(E)]
    Pbar = [sum(Pvec[i][j] for i in range(n)) / n for j in range(E)]
    dev = sum(sum(f[d * per:(d + 1) * per]) / per * sum(Pbar[d * per:(d + 1) * per]) for d in range(D))
    sent = [sum(1 for pk in picks if any(e < E and e // per == d for e, _ in pk)) for d in range(D)]
    comm = sum(D / (M * n) * sent[d] * sum(Pbar[d * per:(d + 1) * per]) for d in range(D))
    return dev, comm


def _balance(cfg: MoEConfig, picks: list, Pvec: list) -> float:
    E, k = len(Pvec[0]), cfg.top_k  # null / zero-computation experts are balanced too
    n = len(picks)
    f = [0.0] * E
    for pk in picks:
        for e, _ in pk:
            f[e] += 1.0 / (n * k)
    Pbar = [sum(Pvec[i][e] for i in range(n)) / n for e in range(E)]
    return E * sum(f[e] * Pbar[e] for e in range(E))


def naive_moe(layer: MoELayer, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> dict:
    cfg = layer.cfg
    E, k = cfg.num_experts, cfg.top_k
    P = {name: t.detach().double() for name, t in layer.state_dict().items()}
    X = x.detach().double().reshape(-1, cfg.d_model)
    T = X.shape[0]
    mask = [True] * T if token_mask is None else [bool(m) for m in token_mask.reshape(-1)]
    toks = [t for t in range(T) if mask[t]]
    n = len(toks)
    seq_of = {t: t // x.shape[1] for t in toks} if (x.dim() == 3 and cfg.seq_aux) else None
    bias = P["router.expert_bias"].tolist() if "router.expert_bias" in P else [0.0] * E
    W = P["router.weight"] if "router.extra_weight" not in P else torch.cat([P["router.weight"],
                                                                              P["router.extra_weight"]])
    logits = [(W @ X[t]).tolist() for t in toks]  # per routed token, over E + the extra experts
    min_gap = math.inf

    # 1. routing: kept[i] = [(expert, weight)] of routed token i; gates[i][e] = pre-drop combine weight
    kept: list[list] = [[] for _ in toks]
    gates = [[0.0] * (E + cfg.num_extra_experts) for _ in toks]
    picks, Pvecs = [], []
    dropped = 0
    if cfg.router == "expert_choice":
        s = [_softmax(lg) for lg in logits]
        C = min(n, math.ceil((cfg.capacity_factor or 1.0) * n * k / E))
        for e in range(E):
            order, gap = _top([s[i][e] for i in range(n)], C)
            min_gap = min(min_gap, gap)
            for i in order:
                kept[i].append((e, s[i][e]))
                gates[i][e] += s[i][e]
    else:
        for i in range(n):
            pk, Pv, gap = _route_token(cfg, logits[i], bias)
            picks.append(pk)
            Pvecs.append(Pv)
            min_gap = min(min_gap, gap)
            for e, w in pk:
                gates[i][e] += w
        # 2. capacity, token-choice routers only (dense ignores it)
        if cfg.capacity_factor is not None and cfg.router != "dense":
            C = min(n, math.ceil(cfg.capacity_factor * n * k / E))
            slots: list[list] = [[] for _ in range(E)]  # (token i, weight) kept by each expert
            if cfg.drop_policy == "position":
                for r in range(k):  # every first choice before any second choice, earliest token first
                    for i in range(n):
                        e, w = picks[i][r]
                        if e >= E:  # null / zero-computation experts take no slot
                            continue
                        if len(slots[e]) < C:
                            slots[e].append((i, w))
                        else:
                            dropped += 1
            else:
                for e in range(E):
                    cand = [(i, w) for i in range(n) for (ee, w) in picks[i] if ee == e]
                    cand.sort(key=lambda iw: -iw[1])
                    # a lone routed pick beside null picks weighs exactly 1 in fp32 as in float64: such
                    # ties are exact, and both sides break them by token order
                    if len(cand) > C and not cand[C - 1][1] == cand[C][1] == 1.0:
                        min_gap = min(min_gap, _gap(cand[C - 1][1], cand[C][1], True))
                    slots[e] = cand[:C]
                    dropped += len(cand[C:])
            for e in range(E):
                for i, w in slots[e]:
                    kept[i].append((e, w))
            for i in range(n):
                kept[i] += [(e, w) for e, w in picks[i] if e >= E]
        else:
            for i in range(n):
                kept[i] = list(picks[i])

    # 3. outputs; padding stays exactly 0
    out = torch.zeros(T, cfg.d_model, dtype=torch.float64)
    for i, t in enumerate(toks):
        y = _shared(P, cfg, X[t])
        for e, w in kept[i]:
            y = y + w * (_expert(P, cfg, e, X[t]) if e < E else _extra_expert(P, cfg, e, X[t]))
        out[t] = y

    # 4. statistics and losses
    tpe = [sum(1 for i in range(n) for e, _ in kept[i] if e == ee) for ee in range(E)]
    if cfg.router in ("expert_choice", "dense") or n == 0:
        balance = 0.0
    elif seq_of is not None:
        per_seq = []
        for b in sorted(set(seq_of.values())):
            ids = [i for i, t in enumerate(toks) if seq_of[t] == b]
            per_seq.append(_balance(cfg, [picks[i] for i in ids], [Pvecs[i] for i in ids]))
        balance = sum(per_seq) / len(per_seq)
    else:
        balance = _balance(cfg, picks, Pvecs)
    lse = [max(lg) + math.log(sum(math.exp(a - max(lg)) for a in lg)) for lg in logits]
    z = sum(v * v for v in lse) / n
    col = [sum(gates[i][e] for i in range(n)) for e in range(E)]
    mean = sum(col) / E
    importance = (sum((c - mean) ** 2 for c in col) / E) / mean**2
    entropy = sum(-sum(a * math.log(a) for a in _softmax(lg) if a > 0) for lg in logits) / n
    aux = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z + cfg.importance_loss_coef * importance
    extra = [sum(1 for i in range(n) for e, _ in kept[i] if e == E + j) for j in range(cfg.num_extra_experts)]
    dev = comm = None
    if cfg.num_devices > 1 and picks and n:
        dev, comm = _device_losses(cfg, picks, Pvecs)
        aux += cfg.device_loss_coef * dev + cfg.comm_loss_coef * comm
    return {"extra_tokens_per_expert": extra, "device_loss": dev, "comm_loss": comm,"output": out.reshape(x.shape), "tokens_per_expert": tpe, "dropped": dropped, "num_tokens": n,
            "balance": balance, "z": z, "importance": importance, "aux": aux, "entropy": entropy,
            "min_gap": min_gap}


def _close(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64).reshape(()),
                               torch.tensor(float(want), dtype=torch.float64), rtol=rtol, atol=atol)


def check_against_naive(layer: MoELayer, x: torch.Tensor, token_mask=None, check_entropy=True) -> dict:
    ref = naive_moe(layer, x, token_mask)
    assert ref["min_gap"] > MIN_GAP, "test data has a near tie at a routing decision; change the seed"
    out = layer(x, token_mask=token_mask)
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    torch.testing.assert_close(out.output.double(), ref["output"], rtol=1e-5, atol=1e-5)
    st = out.stats
    assert st.tokens_per_expert.tolist() == ref["tokens_per_expert"]
    assert int(st.dropped) == ref["dropped"]
    assert int(st.num_tokens) == ref["num_tokens"]
    _close(st.balance_loss, ref["balance"])
    _close(st.z_loss, ref["z"])
    _close(st.importance_loss, ref["importance"])
    if layer.cfg.num_extra_experts:
        assert st.extra_tokens_per_expert.tolist() == ref["extra_tokens_per_expert"]
    for name in ("device_loss", "comm_loss"):
        if ref[name] is not None:
            _close(getattr(st, name), ref[name])
    _close(out.aux_loss, ref["aux"])
    if check_entropy and layer.cfg.router != "sigmoid_bias":  # entropy of p = softmax(l)
        _close(st.router_entropy, ref["entropy"])
    return ref


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "loop"])
@pytest.mark.parametrize("shared", list(SHARED))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("router,mode", CASES, ids=[f"{r}-{m}" for r, m in CASES])
def test_layer_matches_naive_loop(router, mode, activation, shared, impl):
    cfg = make_cfg(router, mode, activation, shared, impl)
    seed = _seed(router, mode, activation, shared)  # same data for both impls
    layer = randomize(MoELayer(cfg), seed).eval()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed + 1))
    ref = check_against_naive(layer, x)
    if mode != "dropless" and ROUTER_CFGS[router]["router"] not in ("expert_choice", "dense"):
        assert ref["dropped"] > 0, "capacity case should drop something, else it tests nothing"


@pytest.mark.parametrize("router", [r for r in ROUTER_CFGS if ROUTER_CFGS[r]["router"] != "switch"])
def test_relu_experts_match_naive_loop(router):
    cfg = make_cfg(router, "dropless", "relu", "shared")
    layer = randomize(MoELayer(cfg), _seed(router, "relu")).eval()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(7))
    check_against_naive(layer, x)


@pytest.mark.parametrize("mode", list(TOKEN_CHOICE_MODES))
@pytest.mark.parametrize("router", ["topk", "switch", "noisy_topk", "sigmoid_bias", "sigmoid_bias_g2"])
def test_sequence_aux_matches_naive_loop(router, mode):
    """(B, S, D) input with seq_aux: the balance term is computed per sequence, then averaged."""
    cfg = make_cfg(router, mode, seq_aux=True, aux_loss_coef=0.1)
    layer = randomize(MoELayer(cfg), _seed(router, mode, "seq")).eval()
    x = torch.randn(3, 8, D, generator=torch.Generator().manual_seed(11))
    check_against_naive(layer, x)


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias", "expert_choice", "dense"])
def test_any_leading_dims(router):
    """x: (..., D): a 1-D token, a flat batch and a 4-D batch give the same per-token results."""
    cfg = make_cfg(router)
    layer = randomize(MoELayer(cfg), _seed(router, "dims")).eval()
    x = torch.randn(2, 3, 4, D, generator=torch.Generator().manual_seed(3))
    check_against_naive(layer, x)
    flat = layer(x.reshape(-1, D)).output
    torch.testing.assert_close(layer(x).output.reshape(-1, D), flat)
    one = layer(x[0, 0, 0])
    assert one.output.shape == (D,)
    check_against_naive(layer, x[0, 0, 0])


@pytest.mark.parametrize("router", list(ROUTER_CFGS))
def test_bf16_input_gives_bf16_output(router):
    """Router in fp32 whatever the dtype: bf16 layer + bf16 input route like float64 on the same values."""
    cfg = make_cfg(router, "dropless", "swiglu", "sharedgate")
    layer = randomize(MoELayer(cfg), _seed(router, "bf16")).eval().to(torch.bfloat16)
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = layer(x)
    assert out.output.dtype == torch.bfloat16 and out.output.shape == x.shape
    ref = naive_moe(layer, x)  # reference from the very same bf16 values, in float64
    assert ref["min_gap"] > MIN_GAP
    assert out.stats.tokens_per_expert.tolist() == ref["tokens_per_expert"]
    torch.testing.assert_close(out.output.double(), ref["output"], rtol=5e-2, atol=5e-2)
    _close(out.stats.z_loss, ref["z"], rtol=1e-4, atol=1e-5)  # fp32 router, not bf16


@pytest.mark.parametrize("router,mode", CASES, ids=[f"{r}-{m}" for r, m in CASES])
def test_nan_token_propagates(router, mode):
    """A NaN token must not be routed away silently (dropped, untaken, zero-weighted): its row is NaN."""
    cfg = make_cfg(router, mode)
    layer = randomize(MoELayer(cfg), _seed(router, mode, "nan")).eval()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(9))
    x[1, 4, 3] = float("nan")
    y = layer(x).output
    assert torch.isnan(y[1, 4]).all(), y[1, 4]


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias", "expert_choice", "dense"])
def test_nan_token_last_among_many_propagates(router):
    """Also when the NaN token is the one a small capacity would drop (position policy, last token)."""
    cfg = make_cfg(router, capacity_factor=0.1, drop_policy="position")
    layer = randomize(MoELayer(cfg), _seed(router, "nan-last")).eval()
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(2))
    x[-1, 0] = float("nan")
    assert torch.isnan(layer(x).output[-1]).all()


@pytest.mark.parametrize("mode", list(TOKEN_CHOICE_MODES))
@pytest.mark.parametrize("router,extra", [("noisy_topk", {}), ("topk", {"router_jitter": 0.2}),
                                          ("sigmoid_bias", {"router_jitter": 0.2})])
def test_nan_token_propagates_in_training(router, extra, mode):
    """Training-only noise (noisy top-k, router jitter) must not hide a NaN either."""
    layer = randomize(MoELayer(make_cfg(router, mode, **extra)), _seed(router, mode, "nan-train")).train()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(12))
    x[0, 7, 0] = float("nan")
    assert torch.isnan(layer(x).output[0, 7]).all()
