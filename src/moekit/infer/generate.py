"""Autoregressive decoding with the KV cache: greedy, temperature, top-k and top-p sampling.

Legend: B batch, S prompt length, L current length (prompt + tokens so far), V vocabulary.

Decoding, step by step:
1. prefill: one forward over the whole (left-padded) prompt fills the KV cache; the last position's
   logits give the first new token;
2. decode: each step feeds only the new token (B, 1); the cache supplies every earlier key/value and
   the model extends its key mask with ones, so left padding stays masked and RoPE positions keep
   counting real tokens only;
3. a row that emitted ``eos_id`` keeps emitting ``eos_id``; decoding stops early once every row has.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moekit.data import load_tokenizer
from moekit.infer.compiled import CompiledDecoder
from moekit.nn.transformer import MoETransformer
from moekit.rundir import RunDir

__all__ = ["filter_logits", "generate", "load_run", "sample_next"]


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (or None for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no limit)")


def filter_logits(logits_BV: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the sampling support; returns a new fp32 tensor.

    top_k keeps the k largest logits of each row (exactly k: ties are broken by index). top_p keeps
    the smallest set of most likely tokens whose probability reaches top_p (the nucleus); the most
    likely token is always kept. With both, top-k is applied first and top-p renormalises over it.
    """
    _check_sampling(0.0, top_k, top_p)
    out_BV = logits_BV.float().clone()
    V = out_BV.shape[-1]
    if top_k is not None and top_k < V:
        keep_BK = out_BV.topk(top_k, dim=-1).indices
        keep_BV = torch.zeros_like(out_BV, dtype=torch.bool).scatter_(-1, keep_BK, True)
        out_BV = out_BV.masked_fill(~keep_BV, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = out_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # probability of the better tokens
        drop_sorted_BV = mass_before_BV >= top_p  # the nucleus is already full without this token
        drop_sorted_BV[..., 0] = False
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)
        out_BV = out_BV.masked_fill(drop_BV, float("-inf"))
    return out_BV


def sample_next(logits_BV: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row, (B,) int64: argmax when temperature == 0, else a draw from
    softmax(filter_logits(logits / temperature))."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = filter_logits(logits_BV.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def generate(model: MoETransformer, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None, attention_mask: Tensor | None = None, *,
             use_cache: bool = True, compile: bool | CompiledDecoder = False) -> Tensor:
    """Extend each prompt by up to ``max_new_tokens`` tokens; returns (B, S + new) int64.

    input_ids: (B, S); prompts of different lengths are left-padded, with attention_mask (B, S)
    0 on the padding. temperature 0 is greedy (deterministic); otherwise tokens are drawn with
    ``generator`` (None = torch's global RNG). Rows that produced ``eos_id`` are filled with it, and
    decoding stops when all rows have. use_cache=False recomputes the whole sequence every step (the
    slow reference the cached path is tested against). The model runs in eval mode (no router noise).
    Dropless token-choice routers give the same tokens with and without the cache; routers that
    compare tokens with each other (expert_choice, a capacity_factor) route a token differently when it
    is decoded alone, so there the two paths may differ. compile=True (or a :class:`CompiledDecoder`, which
    keeps its compiled graphs for the next call) decodes through one compiled graph per step: logits equal
    to rounding, several times fewer per-call costs for small models, seconds of compiling on first use.
    """
    _check_sampling(temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    B, S = input_ids.shape
    limit = model.config.max_seq_len
    if S + max_new_tokens > limit:
        raise ValueError(f"prompt length {S} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_seq_len={limit}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids "
                             f"shape {(B, S)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left padding: the last position of every row must be a real "
                             "token (attention_mask[:, -1] == 1)")
    if compile is not False and not use_cache:
        raise ValueError("compile needs use_cache=True: the compiled step decodes over a static KV cache")
    was_training = model.training
    model.eval()
    decoder = None if compile is False else compile if isinstance(compile, CompiledDecoder) else CompiledDecoder(model)
    try:
        # inference mode skips autograd's per-op bookkeeping (about a tenth of a small model's decode
        # step); the ids come back as a normal tensor, usable anywhere
        with torch.inference_mode():
            ids_BL = _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, generator, eos_id,
                             attention_mask, use_cache, decoder)
        return ids_BL.clone()
    finally:
        model.train(was_training)


def _decode(model: MoETransformer, input_ids: Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, generator: torch.Generator | None, eos_id: int | None,
            attention_mask: Tensor | None, use_cache: bool, decoder: CompiledDecoder | None) -> Tensor:
    """The decoding loop of :func:`generate` (arguments checked there)."""
    B, S = input_ids.shape
    ids_BL = input_ids
    mask_BL = attention_mask
    cache = model.new_kv_cache() if use_cache else None  # sliding-window layers keep their window
    done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    # 1. prefill (and, without a cache, every step): the whole sequence
    logits_BV = model(ids_BL, attention_mask=mask_BL, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    state = decoder.start(cache, mask_BL, S + max_new_tokens) if decoder is not None else None
    for _ in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_B = next_B.masked_fill(done_B, eos_id)
            done_B = done_B | (next_B == eos_id)
        ids_BL = torch.cat([ids_BL, next_B.unsqueeze(1)], dim=1)
        if mask_BL is not None:
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones(B, 1)], dim=1)
        if bool(done_B.all()) or ids_BL.shape[1] == S + max_new_tokens:
            break
        # 2. decode: only the new token when the cache holds the rest (the model extends the mask)
        if state is not None:
            logits_BV = decoder.step(next_B.unsqueeze(1), state)[0]
        elif cache is not None:
            logits_BV = model(next_B.unsqueeze(1), kv_cache=cache).logits[:, -1]
        else:
            logits_BV = model(ids_BL, attention_mask=mask_BL, logits_to_keep=1).logits[:, -1]
    return ids_BL


def load_run(path: str | Path) -> tuple[MoETransformer, Tokenizer]:
    """The model (eval mode, CPU) and tokenizer of a moekit run directory: ``RunDir.load_model`` (which
    checks the weights against the checkpoint manifest) and ``RunDir.tokenizer``. Raises
    FileNotFoundError, ValueError or CheckpointError, each naming the file at fault.
    """
    run = RunDir(path)
    return run.load_model(), load_tokenizer(run.tokenizer_path)
