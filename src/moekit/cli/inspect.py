"""`moekit inspect RUN_DIR`: what each expert of a trained model is routed, on held-out text."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moekit.cli.errors import readable_run

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moekit inspect",
        description="Run a trained model over held-out text and show, per MoE layer, each expert's most "
                    "frequent tokens, its share of each kind of text (code, comments/docstrings, strings, "
                    "whitespace) and how often consecutive tokens keep the same expert.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--tokens", type=int, default=8192, metavar="N",
                   help="held-out tokens to route (default 8192)")
    p.add_argument("--window", type=int, default=256, metavar="N",
                   help="tokens per forward window (default 256)")
    p.add_argument("--top", type=int, default=8, metavar="N",
                   help="most frequent tokens listed per expert (default 8)")
    p.add_argument("--text", type=Path, nargs="+", metavar="PATH",
                   help="analyse these files instead (default none: the run's validation split)")
    p.add_argument("--kinds", choices=("auto", "on", "off"), default="auto", metavar="NAME",
                   help="classify tokens as code/comment/string/whitespace; one of: auto (when the text is "
                        "Python), on, off (default auto)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON (default off: tables)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default none: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from moekit.analysis.specialization import format_specialization, inspect_run
    from moekit.rundir import CONFIG_FILE, CheckpointError, RunDir

    run = args.run_dir
    if not RunDir(run).is_run():
        print(f"moekit inspect: error: {run}: no {CONFIG_FILE}; expected a run directory written by `moekit train`",
              file=sys.stderr)
        return 2
    texts = None
    code_kinds = {"auto": None, "on": True, "off": False}[args.kinds]
    if args.text:
        try:
            texts = [t.read_text(encoding="utf-8", errors="replace") for t in args.text]
        except OSError as e:
            print(f"moekit inspect: error: --text: {e}", file=sys.stderr)
            return 2
        if code_kinds is None:
            code_kinds = all(t.suffix == ".py" for t in args.text)
    try:
        readable_run(run, "moekit inspect")
        spec = inspect_run(run, max_tokens=args.tokens, window=args.window, top=args.top, texts=texts,
                           code_kinds=code_kinds)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"moekit inspect: error: {e}", file=sys.stderr)
        return 1
    try:
        if args.json:
            json.dump(spec.to_dict(), sys.stdout, indent=1, ensure_ascii=False)
            print()
        else:
            print(format_specialization(spec, top=args.top))
    except BrokenPipeError:  # `moekit inspect ... | head`
        sys.stderr.close()
    return 0
