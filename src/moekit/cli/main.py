"""The `moekit` entry point: dispatches `moekit COMMAND ...` to the command's own ``main(argv)``."""
from __future__ import annotations

import importlib
import sys

from moekit.cli.errors import guarded

__all__ = ["COMMANDS", "main"]

# command -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("moekit.cli.train", "train an MoE language model (default: built-in corpus); --compare vs dense"),
    "sweep": ("moekit.cli.sweep", "train 1, 2, 4, ... experts at equal active compute: the Switch scaling curve"),
    "generate": ("moekit.cli.generate", "sample text from a run directory"),
    "bench": ("moekit.cli.bench", "benchmarks: `moekit bench layer` times the MoE layer against dense"),
    "spec": ("moekit.spec.cli", "total/active parameters, FLOPs and memory of a model"),
    "new": ("moekit.spec.new", "write a random model of a preset's real dimensions (sharded run directory)"),
    "convert": ("moekit.cli.convert", "convert a moekit run directory <-> a Hugging Face model directory"),
    "inspect": ("moekit.cli.inspect", "what each expert is routed: top tokens, kinds of text, expert persistence"),
    "report": ("moekit.cli.report", "HTML report of runs: losses, expert load, routing health, specialization"),
    "quantize": ("moekit.cli.quantize", "int8 / int4 weight-only quantization of the routed experts"),
    "prune": ("moekit.cli.prune", "remove experts per layer by routing frequency or REAP"),
    "upcycle": ("moekit.cli.upcycle", "dense run -> MoE run computing exactly the dense model at step 0"),
    "serve": ("moekit.serve.cli", "OpenAI-compatible HTTP server: continuous batching, streaming, MoE metrics"),
}


def _usage() -> str:
    lines = ["usage: moekit COMMAND [options]   (moekit COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return guarded(f"moekit {argv[0]}" if argv and argv[0] in COMMANDS else "moekit", lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from moekit import __version__

        print(f"moekit {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"moekit: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from moekit.runtime import configure

    configure()  # large activations are reused instead of re-faulted every step (moekit.runtime)
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
