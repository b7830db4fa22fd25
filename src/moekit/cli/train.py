"""`moekit train`: a flag for every field of TrainConfig (``--steps``), ModelConfig (``--model.<field>``),
MoEConfig (``--moe.<field>``) and ParallelConfig (``--ep``), generated from the fields (moekit.cli.flags);
the usual model knobs keep short aliases (``--experts`` = ``--moe.num-experts``).

Precedence: built-in defaults < --config FILE < explicit flags. --resume takes the run's own configs;
--init-from PATH takes PATH's model (and tokenizer): only training flags, and the model flags of fields
marked ``training_only`` in moekit.config, apply then.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.cli.errors import UsageError, interrupts_kept
from moekit.cli.flags import add_field_flags, field_flags, flag_name
from moekit.cli.launch import launch_torchrun, make_runtime
from moekit.cli.train_checks import check_flags, claim_out_dir, resumed_train_config
from moekit.cli.train_compare import resume_compare, run_compare
from moekit.config import ModelConfig, MoEConfig, ParallelConfig, TrainConfig, training_only_fields
from moekit.rundir import COMPARE_FILE, CONFIG_FILE, RunDir

__all__ = ["build_parser", "default_model_config", "main", "resolve_configs", "resolve_init_configs",
           "resolve_parallel"]

# the short flags kept beside --model.<field> / --moe.<field>: field -> alias
MODEL_ALIASES = {"d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
                 "n_kv_heads": "n_kv_heads", "moe_every": "moe_every",
                 "first_dense_layers": "first_dense_layers", "dense_d_hidden": "dense_hidden",
                 "tie_embeddings": "tie_embeddings"}
MOE_ALIASES = {"num_experts": "experts", "top_k": "top_k", "router": "router", "d_hidden": "expert_hidden",
               "activation": "activation", "capacity_factor": "capacity_factor", "drop_policy": "drop_policy",
               "aux_loss_coef": "aux_loss_coef", "z_loss_coef": "z_loss_coef",
               "importance_loss_coef": "importance_loss_coef", "num_shared_experts": "shared_experts"}
# fields without a flag of their own
MODEL_SKIP = ("vocab_size",  # --vocab-size: the tokenizer trained on the data sets it
              "moe",  # the --moe.<field> flags
              "mla",  # a nested config: set it in the "model" section of --config
              "rope_scaling",  # likewise
              "dense")  # --dense trains the dense baseline (moekit.train.compare.dense_baseline)
MOE_SKIP = ("d_model",)  # always the model's d_model
# namespace dest -> ModelConfig field ("moe." for MoEConfig's)
MODEL_DESTS = {**field_flags(ModelConfig, prefix="model", aliases=MODEL_ALIASES, skip=MODEL_SKIP),
               **{dest: f"moe.{name}" for dest, name in
                  field_flags(MoEConfig, prefix="moe", aliases=MOE_ALIASES, skip=MOE_SKIP).items()}}
TRAIN_DESTS = field_flags(TrainConfig)
PARALLEL_DESTS = field_flags(ParallelConfig)
# model fields that tune training only (loss weights, token dropping, ...): they still apply with --init-from
TRAINING_ONLY = training_only_fields(ModelConfig)


def default_model_config(vocab_size: int = 4096) -> ModelConfig:
    """The default MoE LM: 4 layers of width 64; 8 experts of hidden 128, top-2 (Mixtral-style).

    Its dense twin (``--dense``) has one SwiGLU MLP of hidden 256 per layer: the same active
    parameters per token, a quarter of the FFN parameters. The width is small so that the default
    budget (3,000 steps, 6.1M tokens, ~2.2 passes over the built-in corpus) is capacity-limited, where
    extra experts have something to hold: README "MoE vs dense" has the measurements behind the choice
    (width 128 at half the steps, 16 experts, Switch top-1 over full-size experts were also run).
    """
    d = 64
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=4, n_heads=4, max_seq_len=1024,
                       moe=MoEConfig(d_model=d, d_hidden=2 * d, num_experts=8, top_k=2, router="topk"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit train", description="Train an MoE language model.",
                                usage="%(prog)s [--config FILE] [--out DIR] [--resume RUN_DIR] [flags]",
                                argument_default=argparse.SUPPRESS)
    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="run directory (default runs/moe; runs/dense with --dense, "
                   "runs/compare with --compare)")
    r.add_argument("--config", metavar="FILE", help="JSON run config {\"model\": {...}, \"train\": {...}}: "
                   "over the defaults, under the flags (default none)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR up to --steps, with its "
                   "own configs; only training flags apply (default none)")
    r.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run: "
                   "its files are removed first (default off: such an --out is refused)")
    r.add_argument("--extend-schedule", action="store_true", help="with --resume and a larger --steps: stretch "
                   "the lr cosine to the new --steps (default off: the run's schedule is kept, its floor lr "
                   "after its end)")
    r.add_argument("--from-step", type=int, metavar="S", help="with --resume: continue from the kept checkpoint "
                   "of step S (see --keep-checkpoints) instead of the latest (default none: the latest)")
    r.add_argument("--dense", action="store_true", help="train the dense baseline: one SwiGLU MLP per layer "
                   "as wide as the active experts, the same active parameters (default off)")
    r.add_argument("--compare", action="store_true", help="train MoE and its dense baseline with the same "
                   "data, steps and seed (default off)")
    r.add_argument("--seeds", type=int, metavar="N", help="with --compare: seed pairs, from --seed up "
                   "(default 1)")
    r.add_argument("--jobs", type=int, metavar="N", help="with --compare: 2 trains each seed's MoE and dense "
                   "runs at the same time, in a process each, with half the cores' threads each unless --threads "
                   "(default 1: one after the other)")
    r.add_argument("--init-from", metavar="PATH", help="start from the model of a moekit run directory or a "
                   "Hugging Face model directory: its architecture, weights and tokenizer.json; only "
                   "training-only model flags apply (default none)")
    add_field_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig())
    model = default_model_config()
    add_field_flags(p.add_argument_group("model (ModelConfig, --model.<field>)"), model, prefix="model",
                    aliases=MODEL_ALIASES, skip=MODEL_SKIP)
    add_field_flags(p.add_argument_group("MoE layers (MoEConfig, --moe.<field>)"), model.moe, prefix="moe",
                    aliases=MOE_ALIASES, skip=MOE_SKIP)
    add_field_flags(p.add_argument_group("expert parallel x data parallel (ParallelConfig)"),
                    ParallelConfig())
    return p


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[leaf] = value


def _file_config(given: dict[str, Any]) -> dict[str, Any]:
    if "config" not in given:
        return {}
    where = f"--config {given['config']}"
    try:
        cfg = json.loads(Path(given["config"]).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {where}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{where} holds a JSON {type(cfg).__name__}; expected an object "
                         '{"model": {...}, "train": {...}}')
    unknown = sorted(set(cfg) - {"model", "train"})
    if unknown:
        raise UsageError(f"{where}: unknown section(s) {', '.join(map(repr, unknown))}; the sections are "
                         '"model" and "train"')
    return cfg


def _train_config(given: dict[str, Any], file_cfg: dict[str, Any]) -> TrainConfig:
    train_d = TrainConfig().to_dict() | file_cfg.get("train", {})
    train_d |= {TRAIN_DESTS[k]: v for k, v in given.items() if k in TRAIN_DESTS}
    return TrainConfig.from_dict(train_d)


def resolve_parallel(ns: argparse.Namespace) -> ParallelConfig:
    """--ep, --nproc, --dist-timeout (ValueError when out of range)."""
    given = vars(ns)
    return ParallelConfig.from_dict({PARALLEL_DESTS[k]: v for k, v in given.items() if k in PARALLEL_DESTS})


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
    for dest, field in MODEL_DESTS.items():
        if dest in given:
            _set(model_d, field, given[dest])
    model_d["moe"]["d_model"] = model_d["d_model"]
    model_d["vocab_size"] = tcfg.vocab_size
    model_d["max_seq_len"] = max(model_d.get("max_seq_len", 0), tcfg.seq_len)
    mcfg = ModelConfig.from_dict(model_d)
    return mcfg, tcfg


def resolve_init_configs(ns: argparse.Namespace, init_cfg: ModelConfig) -> tuple[ModelConfig, TrainConfig]:
    """--init-from PATH: the model is PATH's (``init_cfg``), retuned only by flags of TRAINING_ONLY fields;
    training flags and --config's "train" apply as usual. Anything that would change the architecture is
    refused."""
    given = vars(ns)
    where = f"--init-from {given['init_from']}"
    file_cfg = _file_config(given)
    refused = [flag_name(d) for d in (*MODEL_DESTS, "dense", "compare", "resume")
               if d in given and MODEL_DESTS.get(d) not in TRAINING_ONLY]
    if file_cfg.get("model"):
        refused.append(f"the \"model\" section of --config {given['config']}")
    if refused:
        raise ValueError(f"{where} trains PATH's model as it is; {', '.join(refused)} would change its "
                         "architecture (or start another kind of run): drop them")
    tcfg = _train_config(given, file_cfg)
    if "vocab_size" in given and given["vocab_size"] != init_cfg.vocab_size:
        raise ValueError(f"{where}: --vocab-size {given['vocab_size']} differs from the model's vocab_size "
                         f"{init_cfg.vocab_size}; the data is encoded with the model's own tokenizer: drop it")
    tuned = {MODEL_DESTS[d]: given[d] for d in MODEL_DESTS if d in given}  # all TRAINING_ONLY by now
    moe = {k.removeprefix("moe."): v for k, v in tuned.items() if k.startswith("moe.")}
    mcfg = init_cfg.replace(**{k: v for k, v in tuned.items() if not k.startswith("moe.")},
                            moe=init_cfg.moe.replace(**moe))
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"{where}: --seq-len {tcfg.seq_len} exceeds the model's max_seq_len "
                         f"{mcfg.max_seq_len}")
    return mcfg, tcfg.replace(vocab_size=init_cfg.vocab_size)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    given = vars(ns)
    try:
        check_flags(given, MODEL_DESTS)
        pcfg = resolve_parallel(ns)
        if pcfg.nproc is not None:  # re-run this very command under torchrun with --nproc processes
            if "resume" not in given and pcfg.node_rank == 0:  # other nodes' ranks write under node 0's
                claim_out_dir(_out_dir(given), overwrite="overwrite" in given, compare="compare" in given)
            return launch_torchrun([a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"],
                                   pcfg.nproc, pcfg)
    except ValueError as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 2
    from moekit.rundir import CheckpointError
    from moekit.train.loop import RoutingCollapsed, TrainingDiverged

    try:
        if "resume" in given and "compare" in given:
            return resume_compare(Path(given["resume"]), _overrides(given), _prepare_compare_data,
                                  given.get("jobs", 1))
        if "resume" in given and "init_from" not in given:
            return _resume(given, pcfg)
        return _new_run(ns, pcfg)
    except UsageError as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RoutingCollapsed, CheckpointError, ValueError, OSError) as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective failed: a rank died, hung, or disagrees
        from moekit.parallel import CollectiveError  # imported only then: it loads torch.distributed

        if not isinstance(e, CollectiveError):
            raise
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1


def _resume(given: dict[str, Any], pcfg: ParallelConfig) -> int:
    """--resume RUN: the run's own configs, with this invocation's training overrides."""
    from moekit.data import prepare_data
    from moekit.train.loop import lr_at, train

    run = RunDir(given["resume"])
    if not run.is_run():
        hint = " (a comparison: add --compare)" if (run.path / COMPARE_FILE).is_file() else ""
        raise UsageError(f"--resume {run.path}: no {CONFIG_FILE} there; not a moekit run directory{hint}")
    mcfg = run.config()
    run_tcfg = run.train_config()
    rt = make_runtime(pcfg, run.path, resume=True, compare=False)
    step = given.get("from_step", rt.last_checkpoint_step(run))
    if step is None:
        raise UsageError(f"--resume {run.path}: no checkpoint there yet; start the run again with --overwrite")
    tcfg = resumed_train_config(run_tcfg, _overrides(given), step, extend_schedule="extend_schedule" in given,
                                lr_at=lr_at)
    torch.set_num_threads(tcfg.threads or torch.get_num_threads())
    # a run started with --init-from encodes with its model's tokenizer, kept as the run's own
    tok_path = run.tokenizer_path if run.init_path.is_file() else None
    with interrupts_kept():
        data = rt.rank0_first(lambda: prepare_data(run.data_dir, tcfg.data, tcfg.vocab_size,
                                                   tcfg.max_data_bytes, tokenizer_path=tok_path))
    res = train(mcfg, tcfg, rt.own_dir(run.path), data, resume=True, from_step=given.get("from_step"),
                label=run.path.name, runtime=rt)
    _report(res)
    return 130 if res.interrupted else 0


def _new_run(ns: argparse.Namespace, pcfg: ParallelConfig) -> int:
    """A new run (or --compare pair) from defaults, --config, flags, or --init-from PATH's model."""
    from moekit.data import prepare_data
    from moekit.train.compare import dense_baseline
    from moekit.train.loop import train
    from moekit.train.memory import check_fits

    given = vars(ns)
    init = None
    if "init_from" in given:
        from moekit.train.init import load_init

        init = load_init(given["init_from"])
    try:  # a value out of range, or a run too large for this machine: the command line's fault
        mcfg, tcfg = resolve_init_configs(ns, init.config) if init is not None else resolve_configs(ns)
        check_fits(dense_baseline(mcfg) if "dense" in given else mcfg, tcfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    torch.set_num_threads(tcfg.threads or torch.get_num_threads())
    out = _out_dir(given)
    if init is not None and out.resolve() == init.path.resolve():
        raise UsageError(f"--out {out} is the --init-from directory; write the new run elsewhere")
    if "WORLD_SIZE" not in os.environ:  # under torchrun the launching `moekit train --nproc` checked it
        claim_out_dir(out, overwrite="overwrite" in given, compare="compare" in given)
    rt = make_runtime(pcfg, out, resume=False, compare="compare" in given)
    tok_path = init.tokenizer_path if init is not None else None
    with interrupts_kept():
        data = rt.rank0_first(lambda: prepare_data(RunDir(out).data_dir, tcfg.data, tcfg.vocab_size,
                                                   tcfg.max_data_bytes, tokenizer_path=tok_path))
    if init is None and data.vocab_size != mcfg.vocab_size:
        mcfg = mcfg.replace(vocab_size=data.vocab_size)
    print(f"data: {data.source} | {data.train_tokens:,} train / {data.val_tokens:,} val tokens | vocab "
          f"{data.vocab_size} | unigram entropy {data.unigram_entropy:.3f} nats", file=sys.stderr)
    if "compare" in given:
        return run_compare(mcfg, tcfg, out, data, given.get("seeds", 1), jobs=given.get("jobs", 1))
    if "dense" in given:
        mcfg = dense_baseline(mcfg)
    init_state = None
    if init is not None:
        sep = "none" if init.separator is None else f"id {init.separator}"
        print(f"init: {init.source} {init.path} | vocab {mcfg.vocab_size} | document separator {sep}",
              file=sys.stderr)
        if rt.is_main:
            init.write_run_files(out)
        init_state = init.state
    res = train(mcfg, tcfg, rt.own_dir(out), data, init_state=init_state, label=out.name, runtime=rt)
    _report(res)
    return 130 if res.interrupted else 0


def _report(res) -> None:
    val = f"{res.final_val_loss:.4f}" if res.final_val_loss is not None else "n/a"
    print(f"run {res.run_dir}: step {res.step}, train loss {res.final_loss:.4f}, val loss {val}, "
          f"{res.tokens_per_s:,.0f} tokens/s, {res.wall_s:.0f}s, total params {res.params['total_params']:,}, "
          f"active {res.params['active_params']:,}")


def _out_dir(given: dict[str, Any]) -> Path:
    default = "runs/compare" if "compare" in given else ("runs/dense" if "dense" in given else "runs/moe")
    return Path(given.get("out", default))


def _overrides(given: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields this invocation sets by flag."""
    return {TRAIN_DESTS[k]: v for k, v in given.items() if k in TRAIN_DESTS}


def _prepare_compare_data(out: Path, tcfg: TrainConfig) -> Any:
    from moekit.data import prepare_data

    return prepare_data(RunDir(out).data_dir, tcfg.data, tcfg.vocab_size, tcfg.max_data_bytes)
