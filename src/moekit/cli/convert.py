"""`moekit convert SRC DST`: a moekit run directory <-> a Hugging Face model directory.

The direction follows SRC: a moekit run directory (config.json with "model_type": "moekit",
model.safetensors, tokenizer.json) becomes an HF directory (config.json, safetensors shards) of the
architecture that expresses it exactly -- Mixtral for a plain top-k SwiGLU MoE; anything else that no
supported architecture can express is refused with the reasons. An HF directory (mixtral, qwen2_moe,
qwen3_moe, olmoe, ernie4_5_moe, deepseek_v3) becomes a moekit run directory that ``moekit generate``
and ``moekit train --init-from`` read; its HF config.json is kept as hf_config.json so that converting
back restores the architecture and the token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moekit.cli.errors import readable_run
from moekit.rundir import TOKENIZER_FILE, CheckpointError, RunDir, atomic_copy

__all__ = ["build_parser", "main"]

# tokenizer and generation files carried over in both directions when present (tokenizer.json: the name
# is HF's and moekit's alike)
CARRIED_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", metavar="SRC", help="a moekit run directory or a Hugging Face model directory")
    p.add_argument("dst", metavar="DST", help="output directory, of the other kind")
    p.add_argument(
        "--model-type",
        default=None,
        metavar="NAME",
        help="HF architecture to write, moekit -> HF only (default none: the one the run was converted from, "
        "else the first that expresses the model)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        metavar="NAME",
        help="cast the weights; one of: float32, bfloat16, float16 (default none: keep the source dtype)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest HF safetensors shard, moekit -> HF only, e.g. 5GB, 500MB (default 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a DST that already holds a config.json (default off: such a DST is refused)",
    )
    return p


def _carry(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in CARRIED_FILES:
        if (src / name).is_file():
            atomic_copy(src / name, dst / name)
            copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    from moekit.hf import from_pretrained, is_hf_dir, is_moekit_dir, load_any, save_pretrained
    from moekit.hf.common import CONFIG_FILE as HF_CONFIG

    try:
        readable_run(src, "moekit convert")
        if (dst / HF_CONFIG).exists() and not args.overwrite:
            raise ValueError(f"{dst} already holds a {HF_CONFIG}; pass --overwrite to replace it")
        if src.resolve() == dst.resolve():
            raise ValueError("SRC and DST are the same directory")
        if is_moekit_dir(src):
            model, _ = load_any(src, args.dtype)
            if getattr(model, "quant_spec", None) is not None:  # moekit.compress: no HF layout for packed experts
                raise ValueError(f"{src} is quantized ({model.quant_spec.fmt}); convert the unquantized run")
            out = save_pretrained(model, dst, model_type=args.model_type, max_shard_size=args.max_shard_size)
            kind = json.loads((out / HF_CONFIG).read_text())["model_type"]
            what = f"moekit run directory -> Hugging Face {kind}"
        elif is_hf_dir(src):
            model = from_pretrained(src, args.dtype)
            RunDir(dst).save_model(model)  # config.json, model.safetensors, hf_config.json
            what = f"Hugging Face {model.hf_config['model_type']} -> moekit run directory"
        else:
            raise ValueError(
                f"{src}: no {HF_CONFIG}; expected a moekit run directory or a Hugging Face model directory"
            )
    except (CheckpointError, ValueError) as e:
        print(f"moekit convert: error: {e}", file=sys.stderr)
        return 1
    carried = _carry(src, dst)
    params = model.num_params()
    print(
        f"{what}: {dst} ({params['total_params']:,} parameters, {params['active_params']:,} active per token, "
        f"{model.embed.weight.dtype}); copied {', '.join(carried) or 'no tokenizer files'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
