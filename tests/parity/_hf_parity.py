"""Shared checks of the parity tests: transformers' own modelling code is the reference.

Each check builds a tiny random HF model, saves it, loads it with moekit, and compares in fp32 eval:
logits on a left-padded batch of different lengths, 20 greedy tokens (moekit with its KV cache vs
``generate(do_sample=False)``), and the round trip moekit ``save_pretrained`` -> transformers.
Weights are re-drawn at fan-in scale (not HF's 0.02) so every sub-layer moves the logits by O(1):
a wrong sub-layer cannot hide under the 1e-4 tolerance.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import transformers  # a dev dependency: its absence must fail the suite, not skip it

from moekit.hf import from_pretrained, save_pretrained

TOL = 1e-4
NEW_TOKENS = 20
COMMON = {
    "vocab_size": 160,
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 80,
    "max_position_embeddings": 128,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": 0,
}
RESULTS: dict[str, float] = {}  # test id -> max |logit diff|, printed by conftest at the end


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer redrawn: norms 1 + 0.2 N, biases 0.1 N, router biases 0.05 N,
    matrices N(0, 1 / fan_in), embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if "e_score_correction_bias" in n
    ]
    for name, p in tensors:
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "e_score_correction_bias" in name:
            p.copy_(0.05 * r)
        elif re.search(r"norm(_\w+)?\.weight$", name):  # also DBRX's norm_1 / norm_2 / norm_f
            p.copy_(1 + 0.2 * r)
        elif name.endswith(".bias"):
            p.copy_(0.1 * r)
        elif "embed" in name:
            p.copy_(r)
        else:
            p.copy_(r / math.sqrt(p.shape[-1]))


def build_hf(config, path: Path, seed: int = 0):
    """A random HF model of ``config`` (fp32, eval), saved to ``path``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(path)
    return model


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 9, 5 and 7 (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths, S = (9, 5, 7), 9
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, S - n :] = 1
    return ids, mask


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() and moekit count them
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@torch.no_grad()
def moekit_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(ids, attention_mask=mask).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over real (non-padding) positions."""
    return (a - b).abs()[mask.bool()].max().item()


@torch.no_grad()
def moekit_greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int = NEW_TOKENS) -> torch.Tensor:
    cache = model.new_kv_cache()  # sliding-window layers keep only their window's keys
    logits = model(ids, attention_mask=mask, kv_cache=cache).logits
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        logits = model(nxt[:, None], kv_cache=cache).logits
    return torch.stack(out, dim=1)


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor, n: int = NEW_TOKENS) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def check_parity(config, tmp_path: Path, name: str, seed: int = 0) -> float:
    """All three comparisons; returns the largest logit difference seen."""
    ref = build_hf(config, tmp_path / "hf", seed)
    model = from_pretrained(tmp_path / "hf")
    ids, mask = batch(config.vocab_size, seed + 1)
    # 1. logits
    expected = hf_logits(ref, ids, mask)
    d_load = max_diff(moekit_logits(model, ids, mask), expected, mask)
    assert d_load <= TOL, f"{name}: moekit vs transformers logits differ by {d_load:.3g}"
    # 2. greedy decoding, moekit with its KV cache
    ours, theirs = moekit_greedy(model, ids, mask), hf_greedy(ref, ids, mask)
    assert torch.equal(ours, theirs), f"{name}: greedy tokens differ\nmoekit {ours}\nhf     {theirs}"
    # 3. moekit save_pretrained -> transformers
    save_pretrained(model, tmp_path / "rt")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rt", dtype=torch.float32).eval()
    d_back = max_diff(hf_logits(back, ids, mask), expected, mask)
    assert d_back <= TOL, f"{name}: transformers after moekit's save differs by {d_back:.3g}"
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert set(ref_state) == set(back_state)
    for k in ref_state:
        torch.testing.assert_close(back_state[k], ref_state[k], rtol=0, atol=0, msg=k)
    worst = max(d_load, d_back)
    RESULTS[name] = worst
    return worst
