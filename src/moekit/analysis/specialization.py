"""Expert specialization: which tokens, and which kinds of text, each expert is routed.

Legend: N tokens analysed, A assignments (N * K for top-k routing), E experts, T tokens of one window.

Three swappable pieces:
  1. a *loader* turns a model directory into a ``RoutedModel`` (a tokenizer + ``route(ids_BT) -> {layer:
     LayerRoutes}``); ``load_run_model`` reads a moekit run directory, another loader can wrap an HF model;
  2. ``held_out_documents`` finds the run's validation text (data/val.bin, else the corpus re-read);
  3. ``layer_specialization`` is pure numpy over the routes of N tokens.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.rundir import DATA_DIR, TOKENIZER_FILE, RunDir

__all__ = [
    "ExpertProfile",
    "LayerRoutes",
    "LayerSpecialization",
    "RoutedModel",
    "Specialization",
    "Window",
    "analyse",
    "consecutive_same_rate",
    "format_specialization",
    "held_out_documents",
    "inspect_run",
    "layer_specialization",
    "load_run_model",
    "sample_windows",
    "show_token",
]


@dataclass(frozen=True)
class LayerRoutes:
    """One MoE layer's routing of a (B, T) batch, tokens flattened to N = B * T row-major
    (choices before any capacity drop)."""

    token_A: np.ndarray  # flat token index of each assignment
    expert_A: np.ndarray  # its expert
    top1_N: np.ndarray  # each token's first choice
    num_experts: int


@dataclass
class RoutedModel:
    """What the analysis needs of a model: its tokenizer and its routing of a token sequence."""

    name: str
    tokenizer: Any  # tokenizers.Tokenizer
    max_seq_len: int
    route: Callable[[np.ndarray], dict[int, LayerRoutes]]  # ids (B, T) int64 -> {MoE layer: routes}


def load_run_model(run_dir: str | Path) -> RoutedModel:
    """A moekit run directory (config.json, model.safetensors, tokenizer.json) as a RoutedModel.

    The model is ``RunDir.load_model()`` (the checked load); routing is read with forward hooks on the
    routers, so the model code is untouched.
    """
    import torch

    from moekit.data import load_tokenizer
    from moekit.functional import routing as R

    run = RunDir(run_dir)
    model = run.load_model()
    routers = {b.idx: b.ffn.router for b in model.layers if b.is_moe}

    @torch.no_grad()
    def route(ids_BT: np.ndarray) -> dict[int, LayerRoutes]:
        captured: dict[int, Any] = {}
        hooks = [r.register_forward_hook(lambda _m, _i, out, idx=idx: captured.__setitem__(idx, out))
                 for idx, r in routers.items()]
        try:
            model(torch.as_tensor(np.asarray(ids_BT, dtype=np.int64)))
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for idx, routing in captured.items():
            a = R.assignments(routing)
            top1_N = routing.indices_TK[:, 0] if routing.indices_TK is not None else routing.probs_TE.argmax(-1)
            out[idx] = LayerRoutes(a.token_A.numpy(), a.expert_A.numpy(), top1_N.numpy(),
                                   routers[idx].cfg.num_experts)
        return out

    return RoutedModel(str(run.path), load_tokenizer(run.tokenizer_path), model.config.max_seq_len, route)


# ---------------------------------------------------------------- held-out text

def _find_val_dir(run_dir: Path) -> Path | None:
    """The prepared-data folder of a run whose tokenizer is the run's own (run/data, or ../data for
    the runs of ``moekit train --compare``)."""
    own = run_dir / TOKENIZER_FILE
    for d in (run_dir / DATA_DIR, run_dir.parent / DATA_DIR, run_dir.parent.parent / DATA_DIR):
        complete = all((d / f).is_file() for f in ("val.bin", "val.json", TOKENIZER_FILE))
        if complete and (not own.is_file() or own.read_bytes() == (d / TOKENIZER_FILE).read_bytes()):
            return d
    return None


def _is_python_source(data: str | None) -> bool:
    """The built-in stdlib corpus, a .py file, or a folder whose text files are mostly .py."""
    if data is None:
        return True
    path = Path(data)
    if path.is_dir():
        files = list(itertools.islice((f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")),
                                      2000))
        return bool(files) and sum(f.suffix == ".py" for f in files) > len(files) / 2
    return path.suffix == ".py"


def held_out_documents(run_dir: str | Path, tokenizer: Any) -> tuple[list[str], str, bool]:
    """(documents, description, is_python) of the run's validation split.

    Read from data/val.bin (split at the end-of-text id, decoded); without it, the corpus named in
    train_config.json is re-read with prepare_data's split. is_python: the built-in stdlib corpus or
    a .py file or a folder of mostly .py files, so token kinds (code / comment / string / whitespace)
    are meaningful.
    """
    from moekit.data import TokenDataset, decode, load_corpus

    run_dir = Path(run_dir)
    tcfg_path = RunDir(run_dir).train_config_path
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    data = tcfg.get("data")
    is_python = _is_python_source(data)
    val_dir = _find_val_dir(run_dir)
    if val_dir is not None:
        ds = TokenDataset(val_dir / "val.bin")
        ids_N = np.asarray(ds.tokens_N)
        cuts = np.flatnonzero(ids_N == ds.eot_id)
        bounds = zip(np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [len(ids_N)]]))
        docs = [decode(tokenizer, ids_N[a:b].tolist()) for a, b in bounds if b > a]
        return docs, f"{val_dir / 'val.bin'} ({len(ids_N):,} tokens, {len(docs)} documents)", is_python
    corpus = load_corpus(data, max_bytes=tcfg.get("max_data_bytes"))
    docs = list(corpus.iter_texts("val"))
    return docs, f"validation split of {corpus.source} ({len(docs)} documents)", is_python


@dataclass(frozen=True)
class Window:
    ids_T: np.ndarray
    kinds_T: list[str] | None  # one of moekit.data.CODE_KINDS per token, or None (not Python)


def sample_windows(docs: Sequence[str], tokenizer: Any, max_tokens: int, window: int,
                   code_kinds: bool) -> list[Window]:
    """About ``max_tokens`` tokens in windows of at most ``window``, spread over the documents.

    Documents are visited in an evenly spread order; each gives the window in its middle (so module
    headers do not dominate), or several evenly spaced windows when there are few documents. Kinds are
    computed over the whole document, so a window cut inside a docstring is still classified right.
    """
    from moekit.data import encode, token_kinds

    if max_tokens < 1 or window < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1 and window={window} >= 2")
    docs = [d for d in docs if d]
    n = len(docs)
    order = np.argsort((np.arange(n) * 0.6180339887) % 1.0, kind="stable")  # golden-ratio spread
    per_doc = max(1, math.ceil(math.ceil(max_tokens / window) / max(1, n)))
    out: list[Window] = []
    budget = max_tokens
    for i in order:
        if budget <= 0:
            break
        text = docs[int(i)]
        ids = np.asarray(encode(tokenizer, text), dtype=np.int64)
        kinds = token_kinds(tokenizer, text) if code_kinds else None
        if len(ids) < 2:
            continue
        span = min(window, len(ids))
        starts = np.linspace(0, len(ids) - span, per_doc + 2)[1:-1].astype(int)  # interior points
        for s in dict.fromkeys(starts.tolist()):
            take = min(span, budget)
            if take < 2:
                break
            out.append(Window(ids[s:s + take], kinds[s:s + take] if kinds is not None else None))
            budget -= take
    return out


# ---------------------------------------------------------------- pure analysis

@dataclass
class ExpertProfile:
    expert: int
    load: float  # share of all the layer's assignments
    kind_share: dict[str, float]  # kind -> share of that kind's assignments routed to this expert
    kind_mix: dict[str, float]  # kind -> share of this expert's assignments that are of the kind
    top_tokens: list[dict[str, Any]]  # {"token", "id", "count", "token_share"} most frequent first


@dataclass
class LayerSpecialization:
    layer: int
    num_experts: int
    assignments: int
    same_expert_rate: float  # P(top-1 of token t+1 == top-1 of token t), within a window
    chance_rate: float  # the same if choices were independent with these loads: sum_e p_e^2
    experts: list[ExpertProfile]


@dataclass
class Specialization:
    model: str
    source: str
    tokens: int
    windows: int
    kinds: list[str] | None
    kind_totals: dict[str, float] = field(default_factory=dict)  # kind -> share of the tokens
    layers: list[LayerSpecialization] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def show_token(s: str) -> str:
    """A token's text with its whitespace made visible: space ␣, newline ↵, tab ⇥."""
    return s.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")


def consecutive_same_rate(top1_N: np.ndarray, segment_N: np.ndarray, num_experts: int) -> tuple[float, float]:
    """(rate, chance): how often token t+1 has token t's top-1 expert (pairs within one segment),
    and the rate expected from the top-1 loads alone (sum_e p_e^2)."""
    top1_N, segment_N = np.asarray(top1_N), np.asarray(segment_N)
    pair_P = segment_N[1:] == segment_N[:-1]
    rate = float((top1_N[1:] == top1_N[:-1])[pair_P].mean()) if pair_P.any() else float("nan")
    p_E = np.bincount(top1_N, minlength=num_experts) / max(1, top1_N.size)
    return rate, float((p_E ** 2).sum())


def layer_specialization(layer: int, ids_N: np.ndarray, kind_N: np.ndarray | None, kinds: Sequence[str],
                         token_A: np.ndarray, expert_A: np.ndarray, top1_N: np.ndarray, segment_N: np.ndarray,
                         num_experts: int, decode_one: Callable[[int], str], top: int = 8) -> LayerSpecialization:
    """Profiles of one layer's experts over N routed tokens. kind_N holds indices into ``kinds``."""
    E = num_experts
    count_E = np.bincount(expert_A, minlength=E)
    tok_A = ids_N[token_A]
    token_total = Counter(tok_A.tolist())  # occurrences of each token id over all assignments
    if kind_N is not None:
        kind_A = kind_N[token_A]
        count_CE = np.stack([np.bincount(expert_A[kind_A == c], minlength=E) for c in range(len(kinds))])
    rate, chance = consecutive_same_rate(top1_N, segment_N, E)
    experts = []
    for e in range(E):
        share: dict[str, float] = {}
        mix: dict[str, float] = {}
        if kind_N is not None:
            for c, name in enumerate(kinds):
                share[name] = float(count_CE[c, e] / count_CE[c].sum()) if count_CE[c].sum() else 0.0
                mix[name] = float(count_CE[c, e] / count_E[e]) if count_E[e] else 0.0
        most = Counter(tok_A[expert_A == e].tolist()).most_common(top)
        top_tokens = [{"token": decode_one(t), "id": int(t), "count": int(c), "token_share": c / token_total[t]}
                      for t, c in most]
        experts.append(ExpertProfile(e, float(count_E[e] / max(1, count_E.sum())), share, mix, top_tokens))
    return LayerSpecialization(layer, E, int(count_E.sum()), rate, chance, experts)


def analyse(model: RoutedModel, windows: Sequence[Window], *, source: str = "", top: int = 8) -> Specialization:
    """Route every window through the model and profile each MoE layer's experts."""
    from moekit.data import CODE_KINDS, decode

    kinds = list(CODE_KINDS) if windows and all(w.kinds_T is not None for w in windows) else None
    windows = [Window(w.ids_T[: model.max_seq_len], w.kinds_T[: model.max_seq_len] if kinds else None)
               for w in windows]
    # 1. token ids, window ids and kinds of all N tokens, windows in order
    ids_N = np.concatenate([w.ids_T for w in windows]) if windows else np.zeros(0, dtype=np.int64)
    segment_N = np.concatenate([np.full(len(w.ids_T), i) for i, w in enumerate(windows)]) if windows \
        else np.zeros(0, dtype=np.int64)
    kind_N = np.array([kinds.index(k) for w in windows for k in w.kinds_T], dtype=np.int64) if kinds else None
    start_W = np.concatenate([[0], np.cumsum([len(w.ids_T) for w in windows])]).astype(np.int64)
    # 2. route windows of equal length as one batch (one forward per distinct length)
    routes: dict[int, dict[str, list[np.ndarray]]] = {}
    num_experts: dict[int, int] = {}
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w.ids_T), []).append(i)
    for T, idx in by_len.items():
        res = model.route(np.stack([windows[i].ids_T for i in idx]))
        # map flat batch positions (b * T + t) back to positions in the N-token stream
        pos_N = (start_W[idx][:, None] + np.arange(T)).reshape(-1)
        for layer, r in res.items():
            acc = routes.setdefault(layer, {"token": [], "expert": [], "top1": [], "pos": []})
            acc["token"].append(pos_N[r.token_A])
            acc["expert"].append(r.expert_A)
            acc["top1"].append(r.top1_N)
            acc["pos"].append(pos_N)
            num_experts[layer] = r.num_experts
    cache: dict[int, str] = {}

    def decode_one(t: int) -> str:
        if t not in cache:
            cache[t] = decode(model.tokenizer, [t])
        return cache[t]

    spec = Specialization(model.name, source, int(ids_N.size), len(windows), kinds)
    if kind_N is not None:
        spec.kind_totals = {k: float((kind_N == c).mean()) for c, k in enumerate(kinds)}
    for layer in sorted(routes):
        acc = routes[layer]
        top1_N = np.empty(ids_N.size, dtype=np.int64)
        top1_N[np.concatenate(acc["pos"])] = np.concatenate(acc["top1"])
        spec.layers.append(layer_specialization(
            layer, ids_N, kind_N, kinds or [], np.concatenate(acc["token"]), np.concatenate(acc["expert"]),
            top1_N, segment_N, num_experts[layer], decode_one, top))
    return spec


def inspect_run(run_dir: str | Path, *, max_tokens: int = 8192, window: int = 256, top: int = 8,
                loader: Callable[[Path], RoutedModel] = load_run_model, texts: Sequence[str] | None = None,
                code_kinds: bool | None = None) -> Specialization:
    """Load a model with ``loader`` and profile its experts on held-out text (or on ``texts``).

    code_kinds: classify tokens as code / comment / string / whitespace (None = when the text is Python).
    """
    run_dir = Path(run_dir)
    model = loader(run_dir)
    if texts is None:
        docs, source, is_python = held_out_documents(run_dir, model.tokenizer)
    else:
        docs, source, is_python = list(texts), f"{len(texts)} given text(s)", True
    use_kinds = is_python if code_kinds is None else code_kinds
    windows = sample_windows(docs, model.tokenizer, max_tokens, min(window, model.max_seq_len), use_kinds)
    return analyse(model, windows, source=source, top=top)


def format_specialization(spec: Specialization, *, top: int = 6) -> str:
    """Plain-text tables, one per layer: load, share of each kind of text, most frequent tokens."""
    lines = [f"{spec.model}: {spec.tokens:,} held-out tokens in {spec.windows} windows from {spec.source}"]
    short = {"code": "code", "comment/docstring": "comment", "string": "string", "whitespace": "space"}
    if spec.kinds:
        lines.append("tokens by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in spec.kind_totals.items()))
        lines.append("kind columns: share of all tokens of that kind routed to the expert "
                     "(* = at least 1.5x the expert's overall load and 5%)")
    if not spec.layers:
        lines.append("no MoE layers: nothing is routed")
    for ls in spec.layers:
        ratio = ls.same_expert_rate / ls.chance_rate if ls.chance_rate else float("nan")
        lines += ["", (f"layer {ls.layer}: consecutive tokens keep the same top-1 expert "
                       f"{ls.same_expert_rate:.1%} of the time (chance {ls.chance_rate:.1%}, {ratio:.1f}x)")]
        head = f"{'expert':>6} {'load':>6}" + "".join(f" {short.get(k, k)[:8]:>8}" for k in spec.kinds or [])
        lines.append(head + "  most frequent tokens \u00abtext\u00bb (count, share of that token's occurrences)")
        for ex in ls.experts:
            cells = "".join(f" {ex.kind_share[k]:>7.1%}{'*' if ex.kind_share[k] >= max(1.5 * ex.load, 0.05) else ' '}"
                            for k in spec.kinds or [])
            toks = ", ".join(f"\u00ab{show_token(t['token'])}\u00bb {t['count']} ({t['token_share']:.0%})"
                             for t in ex.top_tokens[:top]) or "(no tokens)"
            lines.append(f"{ex.expert:>6} {ex.load:>6.1%}{cells}  {toks}")
    return "\n".join(lines)
