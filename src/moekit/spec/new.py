"""`moekit new PRESET --out DIR [--layers N] [--dtype float32|bfloat16] [--seed S]`: a randomly initialised
model of a published MoE's real dimensions, written as a moekit run directory.

The run directory holds config.json, a byte-level BPE tokenizer.json (trained on moekit's own sources, a
few hundred ids; the model keeps the preset's vocabulary size) and the weights in safetensors shards with
``model.safetensors.index.json``: one shard for the embedding, one per decoder layer, one for the final
norm and head. Each part is built, initialised (the rules of ``moekit.nn.init.init_weights_`` with the
model's ``init_std``, residual outputs ``init_std / sqrt(2 n_layers)``), cast, written and freed before the
next, so peak memory is one layer, never the whole model.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_parser", "main", "write_random_model"]

TOKENIZER_VOCAB = 512


def _config(preset: str, layers: int | None):
    from moekit.hf.api import config_from_hf
    from moekit.spec.presets import get_preset

    hf = get_preset(preset)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers={layers} must be >= 1")
        hf["num_hidden_layers"] = layers
        if "layer_types" in hf:
            hf["layer_types"] = hf["layer_types"][:layers]
    return config_from_hf(hf)


def _tokenizer():
    from moekit.data.tokenizer import train_tokenizer

    src = Path(__file__).resolve().parents[1]
    texts = [p.read_text(errors="replace") for p in sorted(src.rglob("*.py"))[:40]]
    return train_tokenizer(texts, TOKENIZER_VOCAB)


def _write_part(out: Path, name: str, module: nn.Module, prefix: str, std: float, out_std: float,
                dtype: torch.dtype, seed: int) -> dict[str, str]:
    """Initialise ``module`` (built on meta), write its tensors as shard ``name``; returns its weight map."""
    from safetensors.torch import save_file

    from moekit.nn.init import init_weights_
    from moekit.rundir import atomic_write

    torch.manual_seed(seed)
    module = module.to_empty(device="cpu")
    init_weights_(module, std, out_std)
    tensors = {}
    for k, t in module.state_dict().items():
        keep = not t.is_floating_point() or k.endswith("expert_bias")
        tensors[prefix + k] = (t if keep else t.to(dtype)).contiguous()
    del module
    atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return dict.fromkeys(tensors, name)


def write_random_model(preset: str, out: str | Path, layers: int | None = None, dtype: str = "bfloat16",
                       seed: int = 0, log=print) -> Path:
    """Write the run directory; returns its path."""
    from moekit.data.tokenizer import save_tokenizer
    from moekit.nn.attention import RMSNorm
    from moekit.nn.transformer import Block
    from moekit.rundir import MODEL_INDEX_FILE, RunDir, atomic_write_json

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype!r} must be float32 or bfloat16")
    cfg, td = _config(preset, layers), getattr(torch, dtype)
    out, run = Path(out), RunDir(out)
    run.write_config(cfg)
    save_tokenizer(_tokenizer(), out / "tokenizer.json")
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    n = cfg.n_layers + 2
    shard = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    with torch.device("meta"):
        embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
    weight_map |= _write_part(out, shard[0], embed, "embed.", std, out_std, td, seed)
    for i in range(cfg.n_layers):
        with torch.device("meta"):
            block = Block(cfg, i)
        weight_map |= _write_part(out, shard[i + 1], block, f"layers.{i}.", std, out_std, td, seed + 1 + i)
        log(f"[new] layer {i + 1}/{cfg.n_layers} written")
    head = nn.Module()
    with torch.device("meta"):
        head.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            head.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    weight_map |= _write_part(out, shard[-1], head, "", std, out_std, td, seed + 1 + cfg.n_layers)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    atomic_write_json(out / MODEL_INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map},
                      sort_keys=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    from moekit.spec.presets import PRESETS

    p = argparse.ArgumentParser(prog="moekit new", description="Write a randomly initialised model of a "
                                "preset's real dimensions as a run directory (sharded safetensors).")
    p.add_argument("preset", metavar="PRESET", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the run directory to write (default none: required)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep only the first N decoder layers (default none: all of the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], metavar="NAME",
                   help="dtype of the weights; one of: float32, bfloat16 (default bfloat16)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="initialisation seed (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = write_random_model(args.preset, args.out, args.layers, args.dtype, args.seed,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"moekit new: error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {args.preset}, {size / 2**30:.2f} GiB of weights in {len(list(out.glob('*.safetensors')))} shards")
    return 0
