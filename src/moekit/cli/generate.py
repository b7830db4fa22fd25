"""`moekit generate RUN_DIR --prompt "def "`: continue a prompt with a trained model (KV-cached decoding).

The prompt and its continuation go to stdout; the seed and the speed go to stderr. --temperature 0 is
greedy and deterministic; otherwise the same --seed gives the same text.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit generate",
                                description="Continue a prompt with a trained model.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a moekit run directory (config.json, "
                   "model.safetensors, tokenizer.json) or an HF model directory with a tokenizer.json")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the nucleus of probability p only")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: random, printed to stderr)")
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at the end-of-document token (default: yes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return p


def _load(path: str) -> tuple[Any, Any]:
    """(model, tokenizer). A moekit run directory goes through ``moekit.infer.load_run``, which checks the
    weights against the checkpoint manifest and names the damaged file; any other directory (an HF model
    directory) through ``moekit.hf.load_any`` when that package is present -- and so does a run directory
    that keeps an HF model's config as hf_config.json (``moekit convert``, ``train --init-from``): its
    tokenizer is the HF model's, which may have no <|endoftext|>, and its bos/eos ids are in that config."""
    from moekit.infer.generate import load_run

    try:
        from moekit.hf import is_moekit_dir, load_any
    except ImportError:  # moekit.hf is optional: run directories only
        return load_run(path)
    from moekit.rundir import RunDir

    run = RunDir(path)
    if not run.is_run() or (is_moekit_dir(path) and not run.hf_config_path.is_file()):
        return load_run(path)
    model, tok = load_any(path)
    if tok is None:
        raise FileNotFoundError(f"{path}: no tokenizer.json; generate needs one to encode the prompt")
    return model, tok


def _special_ids(model: Any, tok: Any, path: str | None = None) -> tuple[int | None, int | None]:
    """(start, end) token ids: moekit's document separator, else the HF config's bos/eos ids (the end, else
    the eos token of ``path``'s tokenizer_config.json / config.json, as the training data separated them)."""
    from moekit.data import EOT, document_separator

    eot = tok.token_to_id(EOT)
    if eot is not None:
        return eot, eot
    hf = getattr(model, "hf_config", None) or {}

    def first(v):
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)

    end = first(hf.get("eos_token_id"))
    if end is None and path is not None:
        end = document_separator(tok, path)
    return first(hf.get("bos_token_id")), end


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moekit.data import decode, encode
    from moekit.infer.generate import generate
    from moekit.rundir import CheckpointError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tok = _load(args.run_dir)
        start, end = _special_ids(model, tok, args.run_dir)
        prompt_ids = encode(tok, args.prompt) or ([start] if start is not None else [])
        if not prompt_ids:  # an empty prompt starts a new document, which needs a start token
            raise ValueError("the prompt is empty and the tokenizer has no start token: give --prompt")
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        out = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, generator=gen,
                       eos_id=end if args.stop_at_eot else None)
        dt = time.perf_counter() - t0
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"moekit generate: error: {e}", file=sys.stderr)
        return 1
    new_ids = out[0, len(prompt_ids):].tolist()
    if args.stop_at_eot and end in new_ids:
        new_ids = new_ids[: new_ids.index(end)]
    print(args.prompt + decode(tok, new_ids))
    how = "greedy" if args.temperature == 0 else f"seed {seed}"
    print(f"[generate] {how} | {len(new_ids)} new tokens in {dt:.2f}s "
          f"({len(new_ids) / max(dt, 1e-9):,.0f} tokens/s)", file=sys.stderr)
    return 0
