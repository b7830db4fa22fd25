"""`moekit inspect RUN_DIR`: what each expert of a trained model is routed, on held-out text."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moekit inspect",
        description="Run a trained model over held-out text and show, per MoE layer, each expert's most "
                    "frequent tokens, its share of each kind of text (code, comments/docstrings, strings, "
                    "whitespace) and how often consecutive tokens keep the same expert.")
    p.add_argument("run_dir", type=Path, help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to route (default 8192)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward window (default 256)")
    p.add_argument("--top", type=int, default=8, help="most frequent tokens listed per expert (default 8)")
    p.add_argument("--text", type=Path, nargs="+", help="analyse these files instead of the run's validation split")
    p.add_argument("--kinds", choices=("auto", "on", "off"), default="auto",
                   help="classify tokens as code/comment/string/whitespace (auto: when the text is Python)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
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
        print(f"moekit inspect: {run}: no {CONFIG_FILE}; expected a run directory written by `moekit train`",
              file=sys.stderr)
        return 2
    texts = None
    code_kinds = {"auto": None, "on": True, "off": False}[args.kinds]
    if args.text:
        try:
            texts = [t.read_text(encoding="utf-8", errors="replace") for t in args.text]
        except OSError as e:
            print(f"moekit inspect: --text: {e}", file=sys.stderr)
            return 2
        if code_kinds is None:
            code_kinds = all(t.suffix == ".py" for t in args.text)
    try:
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
