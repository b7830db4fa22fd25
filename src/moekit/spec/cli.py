"""``moekit spec MODEL``: print what a MoE model costs (params, FLOPs, memory) without loading it.

MODEL is a preset name, a run directory holding moekit's ``config.json``, or an HF ``config.json``
(or the directory that holds one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moekit.rundir import RunDir
from moekit.spec.count import count_params
from moekit.spec.presets import PRESETS, PUBLISHED, get_preset
from moekit.spec.report import COMPONENTS, SpecReport, flops_per_token, memory

__all__ = ["add_parser", "build_parser", "load_target", "main", "summary"]

_LABELS = {
    "embeddings": "embeddings (input)", "attention": "attention", "router": "router",
    "routed_experts": "routed experts", "shared_experts": "shared experts", "dense_mlp": "dense MLPs",
    "norms": "norms", "lm_head": "LM head",
}


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("target", metavar="MODEL",
                        help=f"preset ({', '.join(PRESETS)}), run directory, or HF config.json / its directory")
    parser.add_argument("--seq-len", type=int, default=4096, metavar="N",
                        help="context length for attention FLOPs and the KV cache (default 4096)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of tables (default off)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    desc = "Print what a MoE model costs (parameters, FLOPs, memory) from its config, without loading it."
    return _configure(argparse.ArgumentParser(prog="moekit spec", description=desc))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``spec`` on a top-level ``moekit`` parser; its handler is ``args.func(args) -> int``."""
    parser = _configure(subparsers.add_parser("spec", help="params, FLOPs and memory of a MoE model"))
    parser.set_defaults(func=_run)
    return parser


def load_target(target: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) for a path to a config.json or its directory, or a preset name."""
    path = Path(target)
    if path.is_dir():
        path = RunDir(path).config_path  # a run's, or an HF directory's (the same name)
        if not path.is_file():
            raise FileNotFoundError(f"{target!r} is a directory without a {path.name}")
    if path.is_file():
        return str(path), _read_config(path)
    if target.lower() in PRESETS:
        return target.lower(), get_preset(target)
    raise FileNotFoundError(f"{target!r} is neither a file, a directory nor a preset; presets: {', '.join(PRESETS)}")


def _read_config(path: Path) -> dict[str, Any]:
    """A model config.json, or a UsageError-style ValueError that names the file and what it holds."""
    raw = path.read_bytes()
    expected = "expected a model's config.json (a JSON object), a directory holding one, or a preset"
    if not raw.strip():
        raise ValueError(f"{path} is empty; {expected}")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (binary data); {expected}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {expected}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}; {expected}")
    return cfg


def summary(report: SpecReport, seq_len: int = 4096, name: str | None = None) -> dict[str, Any]:
    """Everything ``moekit spec`` knows about a model as one JSON-ready dict (the ``--json`` object)."""
    mem = memory(report, seq_len)
    return {
        "name": name or report.model_type, "model_type": report.model_type,
        "total_params": report.total_params, "active_params": report.active_params,
        "active_params_no_embedding": report.active_params_no_embedding,
        "components": {n: {"total": c.total, "active": c.active} for n, c in report.components.items()},
        "architecture": {"hidden_size": report.hidden_size, "num_layers": report.num_layers,
                         "num_moe_layers": report.num_moe_layers, "num_experts": report.num_experts,
                         "experts_per_token": report.experts_per_token,
                         "tied_embeddings": report.tied_embeddings},
        "seq_len": seq_len, "flops_per_token": flops_per_token(report, seq_len),
        "memory": mem["weights_bytes"], "kv_cache": mem["kv_cache"], "notes": list(report.notes),
    }


def _num(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} B"


def _table(title: str, columns: tuple[str, ...]) -> Any:
    """A rich table titled on the left: the first column (labels) left-aligned, the numbers right-aligned."""
    from rich.table import Table  # rich only when a table is printed

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def _headline(s: dict[str, Any]) -> str:
    arch = s["architecture"]
    return (f"[bold]{s['name']}[/] ({s['model_type']}): {arch['num_layers']} layers, "
            f"d_model {arch['hidden_size']}, {arch['num_moe_layers']} MoE layers, {arch['num_experts']} "
            f"experts, {arch['experts_per_token']} per token, "
            f"{'tied' if arch['tied_embeddings'] else 'untied'} embeddings")


def _params_table(s: dict[str, Any]) -> Any:
    params = _table("Parameters", ("component", "total", "active / token", "% of total"))
    total, tied = s["total_params"], s["architecture"]["tied_embeddings"]
    for name in COMPONENTS:
        c = s["components"][name]
        label = _LABELS[name] + (" (tied: in embeddings)" if name == "lm_head" and tied else "")
        params.add_row(label, _num(c["total"]), _num(c["active"]), f"{100 * c['total'] / total:.1f}")
    params.add_section()
    params.add_row("[bold]total[/] (input embedding + LM head counted)", _num(total), _num(s["active_params"]),
                   "100.0")
    params.add_row("active w/o input embedding (DeepSeek, gpt-oss cards)", "",
                   _num(s["active_params_no_embedding"]), "")
    return params


def _flops_table(s: dict[str, Any]) -> Any:
    fl = s["flops_per_token"]
    flops = _table(f"Forward FLOPs per token at seq_len {s['seq_len']} (2 per multiply-add)",
                   ("part", "FLOPs", "%"))
    rows = [("attention projections", "attention_projections"),
            ("attention scores + values (grows with seq_len)", "attention_scores"),
            ("MoE: router", "router"), ("MoE: routed experts", "routed_experts"),
            ("MoE: shared experts", "shared_experts"), ("MoE total", "moe"), ("dense MLPs", "dense_mlp"),
            ("LM head", "lm_head")]
    for label, key in rows:
        flops.add_row(label, _num(fl[key]), f"{100 * fl[key] / fl['total']:.1f}")
    flops.add_section()
    flops.add_row("[bold]total[/]", _num(fl["total"]), "100.0")
    return flops


def _memory_tables(s: dict[str, Any]) -> tuple[Any, Any]:
    """The weights' bytes per dtype, and the KV cache's."""
    kv, dtypes = s["kv_cache"], ("fp32", "bf16", "int8", "int4")
    mem = _table("Weights", ("", *dtypes))
    mem.add_row("all weights", *(_bytes(s["memory"][dt]) for dt in dtypes))
    cache = _table("KV cache", ("", "bf16", "fp32"))
    for label, key in (("per token, per layer", "bytes_per_token_per_layer"),
                       (f"per token, all {len(kv['elements_per_token_per_layer'])} caching layers", "bytes_per_token"),
                       (f"one sequence of {s['seq_len']} tokens", "bytes_at_seq_len")):
        cache.add_row(label, _bytes(kv[key]["bf16"]), _bytes(kv[key]["fp32"]))
    return mem, cache


def _notes(s: dict[str, Any]) -> list[str]:
    """The report's own notes, then what the tables cannot show (uneven caches, windows, published counts)."""
    notes, kv = list(s["notes"]), s["kv_cache"]
    if len(set(kv["elements_per_token_per_layer"])) > 1:
        notes.append("the KV cache per token differs between layers; 'per layer' shows the largest")
    if kv["sliding_window_layers"]:
        notes.append(f"{kv['sliding_window_layers']} sliding-window layers cache at most their window")
    if s["name"] in PUBLISHED:
        pub = PUBLISHED[s["name"]]
        notes.append(f"published: {pub.total} total, {pub.active} active "
                     f"({'without' if pub.convention == 'no_embedding' else 'with'} input embedding; "
                     f"{pub.source})")
    return notes


def _stored_table(st: dict[str, Any]) -> Any:
    fmt = st["format"]
    title = "model.safetensors as stored" + (f" ({fmt['fmt']}{' group ' + str(fmt['group']) if fmt.get('group') else ''}"
                                             f", {fmt['method']})" if fmt else "")
    t = _table(title, ("part", "weights", "bytes", "bits / weight (scales included)"))
    for part in ("routed_experts", "shared_experts", "attention", "other"):
        p = st[part]
        if p["weights"]:
            t.add_row(_LABELS.get(part, "embeddings, norms, routers, head"), _num(p["weights"]), _bytes(p["bytes"]),
                      f"{p['bits_per_weight']:.3f}")
    t.add_section()
    t.add_row("[bold]file[/]", "", _bytes(st["file_bytes"]), "")
    return t


def _print_tables(s: dict[str, Any]) -> None:
    from rich.console import Console  # rich only when a table is printed

    con = Console()
    if not con.is_terminal:  # piped or captured: rich would wrap at 80 columns
        con.width = 110
    con.print(_headline(s))
    for table in (_params_table(s), _flops_table(s), *_memory_tables(s)):
        con.print(table)
    if "stored" in s:
        con.print(_stored_table(s["stored"]))
    for note in _notes(s):
        con.print(f"note: {note}")


def _run(args: argparse.Namespace) -> int:
    try:
        name, cfg = load_target(args.target)
        s = summary(count_params(cfg), args.seq_len, name=name)
        if Path(args.target).is_dir() and RunDir(args.target).model_path.is_file():
            from moekit.spec.quant import quant_summary  # bytes as stored (a quantized run: its format)

            s["stored"] = quant_summary(args.target)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        print(f"moekit spec: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_tables(s)
    return 0


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
