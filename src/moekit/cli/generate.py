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

from moekit.cli.errors import readable_run

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit generate",
                                description="Continue a prompt with a trained model.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a moekit run directory (config.json, "
                   "model.safetensors, tokenizer.json) or an HF model directory with a tokenizer.json")
    p.add_argument("--prompt", default="", metavar="TEXT",
                   help="text to continue (default empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="X",
                   help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="N",
                   help="sample from the N most likely tokens only (default none: all tokens)")
    p.add_argument("--top-p", type=float, default=None, metavar="X",
                   help="sample from the nucleus of probability X only (default none: all tokens)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="sampling seed (default none: random, printed to stderr)")
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at the end-of-document token (default on)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op CPU threads (default none: one per 32 MiB of weights a token reads, "
                        "at most the cores; 1 for small models)")
    p.add_argument("--compile", action="store_true",
                   help="decode through one torch.compile'd graph per step (inductor): several times fewer "
                        "per-call costs for small models; compiling takes seconds to a minute, cached on disk; "
                        "logits equal to rounding (default off)")
    from moekit.cli.offload import add_offload_args

    add_offload_args(p)  # --expert-memory, --expert-cache, --prefetch, --read, --trace
    return p


def _load(path: str) -> tuple[Any, Any]:
    """(model, tokenizer): ``moekit.infer.load.load_for_inference`` (shared with ``moekit serve``)."""
    from moekit.infer.load import load_for_inference

    return load_for_inference(path)


def _special_ids(model: Any, tok: Any, path: str | None = None) -> tuple[int | None, int | None]:
    """(start, end) token ids: ``moekit.infer.load.special_ids``."""
    from moekit.infer.load import special_ids

    return special_ids(model, tok, path)


def _compiled(model: Any, offloaded: Any, total: int) -> Any:
    """A :class:`moekit.infer.CompiledDecoder` with its graph compiled (the time printed, not counted in the
    tokens/s)."""
    from moekit.infer.compiled import CompiledDecoder

    if offloaded is not None:
        raise ValueError("--compile decodes with every expert resident: drop --expert-memory, or --compile")
    decoder = CompiledDecoder(model)
    with torch.inference_mode():
        print(f"[generate] decode step compiled in {decoder.warm_up(1, total):.1f}s", file=sys.stderr)
    return decoder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moekit.data import decode, encode
    from moekit.infer.generate import generate
    from moekit.rundir import CheckpointError

    try:
        readable_run(args.run_dir, "moekit generate")
        if args.expert_memory is not None:  # routed experts stay on disk (moekit.infer.offload)
            from moekit.cli.offload import load_offloaded_from_args

            model, tok, offloaded = load_offloaded_from_args(args)
        else:
            (model, tok), offloaded = _load(args.run_dir), None
        from moekit.infer.load import ready_to_decode  # default: one thread per 32 MiB a token reads

        ready_to_decode(model, args.threads)
        start, end = _special_ids(model, tok, args.run_dir)
        prompt_ids = encode(tok, args.prompt) or ([start] if start is not None else [])
        if not prompt_ids:  # an empty prompt starts a new document, which needs a start token
            raise ValueError("the prompt is empty and the tokenizer has no start token: give --prompt")
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        gen = torch.Generator().manual_seed(seed)
        decoder = _compiled(model, offloaded, len(prompt_ids) + args.max_new_tokens) if args.compile else False
        t0 = time.perf_counter()
        out = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, generator=gen,
                       eos_id=end if args.stop_at_eot else None, compile=decoder)
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
          f"({len(new_ids) / max(dt, 1e-9):,.0f} tokens/s, {torch.get_num_threads()} thread(s))", file=sys.stderr)
    if offloaded is not None:
        from moekit.cli.offload import report_offload

        report_offload(args, offloaded)
    return 0
