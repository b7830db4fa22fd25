"""`moekit train`: flags come from the TrainConfig fields plus the model's MoE knobs.

Precedence: built-in defaults < --config FILE < explicit flags. --resume takes the run's own configs;
--init-from PATH takes PATH's model (and tokenizer): only training flags apply then.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.config import ACTIVATIONS, DROP_POLICIES, ROUTERS, MoEConfig
from moekit.nn.transformer import ModelConfig
from moekit.train.config import TrainConfig

__all__ = ["build_parser", "default_model_config", "main", "resolve_configs", "resolve_init_configs"]

# model flag -> (ModelConfig or MoEConfig field, type, help)
MODEL_FLAGS: dict[str, tuple[str, Any, str]] = {
    "d_model": ("d_model", int, "model width"),
    "n_layers": ("n_layers", int, "transformer blocks"),
    "n_heads": ("n_heads", int, "attention heads"),
    "n_kv_heads": ("n_kv_heads", int, "key/value heads (grouped-query attention)"),
    "experts": ("moe.num_experts", int, "routed experts per MoE layer"),
    "top_k": ("moe.top_k", int, "experts per token"),
    "router": ("moe.router", str, f"one of {ROUTERS}"),
    "expert_hidden": ("moe.d_hidden", int, "hidden width of each expert"),
    "activation": ("moe.activation", str, f"one of {ACTIVATIONS}"),
    "capacity_factor": ("moe.capacity_factor", float, "expert capacity factor (omit for dropless)"),
    "drop_policy": ("moe.drop_policy", str, f"one of {DROP_POLICIES}"),
    "aux_loss_coef": ("moe.aux_loss_coef", float, "load-balancing loss weight"),
    "z_loss_coef": ("moe.z_loss_coef", float, "router z-loss weight"),
    "importance_loss_coef": ("moe.importance_loss_coef", float, "importance loss weight"),
    "shared_experts": ("moe.num_shared_experts", int, "shared (always-on) experts"),
    "moe_every": ("moe_every", int, "every n-th layer is MoE"),
    "first_dense_layers": ("first_dense_layers", int, "first k layers are dense"),
    "dense_hidden": ("dense_d_hidden", int, "hidden width of dense MLPs"),
}
# model flags that tune training only (loss weights, token dropping): they still apply with --init-from
TRAINING_MODEL_FLAGS = ("capacity_factor", "drop_policy", "aux_loss_coef", "z_loss_coef", "importance_loss_coef")


def default_model_config(vocab_size: int = 4096) -> ModelConfig:
    """The default MoE LM: 4 layers of width 128; 8 experts of hidden 256, top-2 (Mixtral-style).

    Its dense twin (``--dense``) has one SwiGLU MLP of hidden 512 per layer: the same active
    parameters per token, a quarter of the FFN parameters. README "MoE vs dense" has the measurements
    behind this choice (Switch top-1 over 8 full-size experts and top-2 over 16 experts were also run).
    """
    d = 128
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=4, n_heads=4, max_seq_len=1024,
                       moe=MoEConfig(d_model=d, d_hidden=2 * d, num_experts=8, top_k=2, router="topk"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit train", description="Train an MoE language model.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--out", help="run directory (default runs/moe, runs/compare with --compare)")
    p.add_argument("--config", help="JSON run config: {\"model\": {...}, \"train\": {...}} (flags override)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR up to --steps")
    p.add_argument("--dense", action="store_true", help="train the dense baseline (same active parameters)")
    p.add_argument("--compare", action="store_true", help="train MoE and dense with the same data/steps/seed")
    p.add_argument("--seeds", type=int, help="with --compare: number of seed pairs (default 1)")
    p.add_argument("--init-from", metavar="PATH", help="start from the model of a moekit run directory or "
                   "a Hugging Face model directory: its architecture, weights and tokenizer.json")
    g = p.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name in ("threads",):
                typ = int
            g.add_argument(flag, type=typ, help=f"default {f.default!r}")
    m = p.add_argument_group("model")
    for flag, (_, typ, help_) in MODEL_FLAGS.items():
        m.add_argument("--" + flag.replace("_", "-"), type=typ, help=help_)
    m.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction)
    d = p.add_argument_group("distributed (issue 7): expert parallel x data parallel")
    d.add_argument("--ep", type=int, help="expert-parallel size: each MoE layer's experts split over this "
                   "many ranks; the rest of the world is data parallel (default 1)")
    d.add_argument("--nproc", type=int, help="run on this many local processes (wraps torchrun; CPU: gloo)")
    d.add_argument("--dist-timeout", type=float, help="seconds a collective waits for a silent rank "
                   "(default 300)")
    return p


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[leaf] = value


def _file_config(given: dict[str, Any]) -> dict[str, Any]:
    if "config" not in given:
        return {}
    try:
        return json.loads(Path(given["config"]).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"moekit train: cannot read --config {given['config']}: {e}")


def _train_config(given: dict[str, Any], file_cfg: dict[str, Any]) -> TrainConfig:
    train_d = TrainConfig().to_dict() | file_cfg.get("train", {})
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_d |= {k: v for k, v in given.items() if k in train_names}
    return TrainConfig.from_dict(train_d)


def resolve_configs(ns: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    given = vars(ns)
    file_cfg = _file_config(given)
    tcfg = _train_config(given, file_cfg)
    model_d = default_model_config(tcfg.vocab_size).to_dict()
    model_d.pop("model_type")
    for k, v in file_cfg.get("model", {}).items():
        if k == "moe":
            model_d["moe"].update(v)
        else:
            model_d[k] = v
    for flag, (field, _, _) in MODEL_FLAGS.items():
        if flag in given:
            _set(model_d, field, given[flag])
    if "tie_embeddings" in given:
        model_d["tie_embeddings"] = given["tie_embeddings"]
    model_d["moe"]["d_model"] = model_d["d_model"]
    model_d["vocab_size"] = tcfg.vocab_size
    model_d["max_seq_len"] = max(model_d.get("max_seq_len", 0), tcfg.seq_len)
    mcfg = ModelConfig.from_dict(model_d)
    return mcfg, tcfg


def resolve_init_configs(ns: argparse.Namespace, init_cfg: ModelConfig) -> tuple[ModelConfig, TrainConfig]:
    """--init-from PATH: the model is PATH's (``init_cfg``), retuned only by TRAINING_MODEL_FLAGS; training
    flags and --config's "train" apply as usual. Anything that would change the architecture is refused."""
    given = vars(ns)
    where = f"--init-from {given['init_from']}"
    file_cfg = _file_config(given)
    refused = [f"--{f.replace('_', '-')}" for f in (*MODEL_FLAGS, "tie_embeddings", "dense", "compare", "resume")
               if f in given and f not in TRAINING_MODEL_FLAGS]
    if file_cfg.get("model"):
        refused.append(f"the \"model\" section of --config {given['config']}")
    if refused:
        raise ValueError(f"{where} trains PATH's model as it is; {', '.join(refused)} would change its "
                         "architecture (or start another kind of run): drop them")
    tcfg = _train_config(given, file_cfg)
    if "vocab_size" in given and given["vocab_size"] != init_cfg.vocab_size:
        raise ValueError(f"{where}: --vocab-size {given['vocab_size']} differs from the model's vocab_size "
                         f"{init_cfg.vocab_size}; the data is encoded with the model's own tokenizer: drop it")
    if tcfg.seq_len > init_cfg.max_seq_len:
        raise ValueError(f"{where}: --seq-len {tcfg.seq_len} exceeds the model's max_seq_len "
                         f"{init_cfg.max_seq_len}")
    moe = {MODEL_FLAGS[f][0].removeprefix("moe."): given[f] for f in TRAINING_MODEL_FLAGS if f in given}
    return init_cfg.replace(moe=init_cfg.moe.replace(**moe)), tcfg.replace(vocab_size=init_cfg.vocab_size)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    given = vars(ns)
    if "nproc" in given:  # [issue 7] re-run this very command under torchrun with --nproc processes
        return _launch_torchrun(list(sys.argv[1:] if argv is None else argv), given["nproc"])
    from moekit.data import prepare_data
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.compare import compare, dense_baseline, format_summary
    from moekit.train.loop import RoutingCollapsed, TrainingDiverged, train

    try:
        init = None
        if "resume" in given and "init_from" not in given:
            run = Path(given["resume"])
            if not (run / "config.json").is_file():
                print(f"moekit train: --resume {run}: no config.json there; not a moekit run directory",
                      file=sys.stderr)
                return 2
            mcfg = ModelConfig.from_json(run / "config.json")
            tcfg = TrainConfig.from_json(run / "train_config.json")
            overrides = {k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
            tcfg = tcfg.replace(**overrides)
        elif "init_from" in given:
            from moekit.train.init import load_init

            init = load_init(given["init_from"])
            mcfg, tcfg = resolve_init_configs(ns, init.config)
        else:
            mcfg, tcfg = resolve_configs(ns)
        torch.set_num_threads(tcfg.threads or torch.get_num_threads())
        # [issue 7] expert/data parallel under torchrun, or a DCP run resumed on one process; None = plain run
        dctx = _distributed_context(given, Path(given["resume"] if "resume" in given else
                                                given.get("out", "runs/moe")))
        if "resume" in given:
            from moekit.train.init import INIT_FILE

            # a run started with --init-from encodes with its model's tokenizer, kept as the run's own
            tok_path = run / "tokenizer.json" if (run / INIT_FILE).is_file() else None
            data = _rank0_first(dctx, lambda: prepare_data(run / "data", tcfg.data, tcfg.vocab_size,
                                                           tcfg.max_data_bytes, tokenizer_path=tok_path))
            res = train(mcfg, tcfg, _rank_dir(run, dctx), data, resume=True, label=run.name, dist=dctx)
            _report(res)
            return 130 if res.interrupted else 0
        default_out = "runs/compare" if "compare" in given else ("runs/dense" if "dense" in given else "runs/moe")
        out = Path(given.get("out", default_out))
        if init is not None and out.resolve() == init.path.resolve():
            raise ValueError(f"--out {out} is the --init-from directory; write the new run elsewhere")
        data_dir = out / "data"
        tok_path = init.tokenizer_path if init is not None else None
        data = _rank0_first(dctx, lambda: prepare_data(data_dir, tcfg.data, tcfg.vocab_size, tcfg.max_data_bytes,
                                                       tokenizer_path=tok_path))  # [issue 7]
        if init is None and data.vocab_size != mcfg.vocab_size:
            mcfg = mcfg.replace(vocab_size=data.vocab_size)
        print(f"data: {data.source} | {data.train_tokens:,} train / {data.val_tokens:,} val tokens | vocab "
              f"{data.vocab_size} | unigram entropy {data.unigram_entropy:.3f} nats", file=sys.stderr)
        if "compare" in given:
            summary = compare(mcfg, tcfg, out, data, seeds=given.get("seeds", 1))
            if summary.get("interrupted"):
                return 130
            print(format_summary(summary))
            print(f"summary: {out / 'summary.json'}")
            _maybe_report(out, summary)
            return 0
        if "dense" in given:
            mcfg = dense_baseline(mcfg)
        init_state = None
        if init is not None:
            sep = "none" if init.separator is None else f"id {init.separator}"
            print(f"init: {init.source} {init.path} | vocab {mcfg.vocab_size} | document separator {sep}",
                  file=sys.stderr)
            if dctx is None or dctx.is_main:
                init.write_run_files(out)
            init_state = init.state
        res = train(mcfg, tcfg, _rank_dir(out, dctx), data, init_state=init_state, label=out.name, dist=dctx)
        _report(res)
        return 130 if res.interrupted else 0
    except (TrainingDiverged, RoutingCollapsed, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # [issue 7] a collective failed: a rank died, hung, or disagrees
        from moekit.parallel import CollectiveError

        if not isinstance(e, CollectiveError):
            raise
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1


def _report(res) -> None:
    val = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    print(f"run {res.run_dir}: step {res.step}, train loss {res.final_loss:.4f}, val loss {val}, "
          f"{res.tokens_per_s:,.0f} tokens/s, {res.wall_s:.0f}s, total params {res.params['total_params']:,}, "
          f"active {res.params['active_params']:,}")


def _maybe_report(out: Path, summary: dict) -> None:
    """Write the HTML report of the comparison when the analysis package provides it."""
    try:
        from moekit.analysis.report import write_report
    except ImportError:
        return
    runs = [Path(r["run_dir"]) for r in summary["moe"]["per_seed"][:1] + summary["dense"]["per_seed"][:1]]
    path = write_report(runs, out / "report")
    print(f"report: {path}")


# -- issue 7: expert parallel x data parallel ------------------------------------------------------------


def _launch_torchrun(argv: list[str], nproc: int) -> int:
    """``moekit train --nproc N ARGS`` = ``torchrun --standalone --nproc-per-node N -m moekit train ARGS``."""
    if nproc < 1:
        print(f"moekit train: error: --nproc={nproc} must be >= 1", file=sys.stderr)
        return 2
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "moekit", "train", *rest]
    print("moekit train: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def _distributed_context(given: dict[str, Any], run_dir: Path):
    """A DistributedContext when started by torchrun (WORLD_SIZE in the environment), or when resuming a
    DCP run on one process; None for a plain single-process run."""
    ep = given.get("ep", 1)
    if "WORLD_SIZE" not in os.environ:
        if ep != 1:
            raise ValueError(f"--ep {ep} needs a multiple of {ep} processes: add --nproc N or use torchrun")
        if "resume" in given and (run_dir / "dcp").is_dir():  # "dcp" = moekit.train.distributed.DCP_DIR
            # imported only here: torch.distributed.checkpoint costs seconds of start-up on a plain run
            from moekit.train.distributed import DistributedContext

            return DistributedContext(None, run_dir)  # a distributed run, resumed on one process
        return None
    from moekit.train.distributed import DistributedContext
    if "compare" in given:
        raise ValueError("--compare trains single-process runs; drop --nproc/--ep (or torchrun)")
    from moekit.parallel import build_groups, init_distributed, pick_backend
    from moekit.parallel.groups import destroy

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(pick_backend(cuda), rank, world, given.get("dist_timeout", 300.0))
    atexit.register(destroy)
    groups = build_groups(ep)
    if rank != 0:  # rank 0 reports; the others keep stderr for their own errors
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return DistributedContext(groups, run_dir)


def _rank_dir(run_dir: Path, dctx) -> Path:
    """Rank 0 writes the run directory; rank r > 0 its own metrics and logs under ranks/rank<r>."""
    return run_dir if dctx is None or dctx.is_main else run_dir / "ranks" / f"rank{dctx.rank}"


def _rank0_first(dctx, fn):
    """Rank 0 builds (e.g. the token files), then the other ranks reuse what it built."""
    if dctx is None or dctx.groups is None:
        return fn()
    from moekit.parallel.groups import barrier

    if dctx.is_main:
        result = fn()
        barrier("waiting for rank 0 to prepare the data")
        return result
    barrier("waiting for rank 0 to prepare the data")
    return fn()
