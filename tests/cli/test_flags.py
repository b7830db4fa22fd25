"""`moekit train` flags generated from the config fields: --model.<field> / --moe.<field> and their short
aliases, the types parsed from the annotations, help text with defaults, and --init-from's refusals read
from the fields' training_only marking."""
from __future__ import annotations

import json
import re

import pytest

from moekit.cli.train import build_parser, default_model_config, resolve_configs, resolve_init_configs
from moekit.config.moe import ROUTERS


def configs(*argv: str):
    return resolve_configs(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("long, short", [
    (["--moe.num-experts", "6"], ["--experts", "6"]),
    (["--moe.d-hidden", "24"], ["--expert-hidden", "24"]),
    (["--model.dense-d-hidden", "40"], ["--dense-hidden", "40"]),
    (["--model.no-tie-embeddings"], ["--no-tie-embeddings"]),
    (["--moe.router", "switch", "--moe.top-k", "1"], ["--router", "switch", "--top-k", "1"]),
])
def test_long_and_short_flags_set_the_same_field(long, short):
    assert configs(*long) == configs(*short) != configs()


def test_types_come_from_the_annotations():
    m, t = configs("--moe.capacity-factor", "1.5", "--model.dense-layers", "0", "2", "--moe.seq-aux",
                   "--n-kv-heads", "2", "--model.clip-qkv", "none", "--threads", "3", "--data", "none",
                   "--compile")
    assert (m.moe.capacity_factor, m.dense_layers, m.moe.seq_aux, m.n_kv_heads, m.clip_qkv) == \
        (1.5, (0, 2), True, 2, None)
    assert (t.threads, t.data, t.compile) == (3, None, True)
    m, _ = configs("--moe.capacity-factor", "1.5", "--capacity-factor", "none")  # the last one wins
    assert m.moe.capacity_factor is None


def test_enum_fields_take_only_their_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--router", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_every_flag_says_what_it_does_and_its_default():
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    for a in actions:
        assert a.help and "(default " in a.help, a.option_strings
        assert not re.search(r"issue \d|\('", a.help), a.help
    helps = {s: a.help for a in actions for s in a.option_strings}
    assert helps["--experts"] == "routed experts per MoE layer (default 8)"
    assert f"one of: {', '.join(ROUTERS)} (default topk)" in helps["--router"]
    assert {"topk", "switch", "noisy_topk", "expert_choice", "sigmoid_bias", "dense"} <= set(ROUTERS)
    assert {"--ep", "--nproc", "--dist-timeout", "--steps", "--seed", "--lr", "--model.rope-theta",
            "--moe.score-func", "--no-compile", "--model.no-qk-norm"} <= set(helps)
    assert "%%" not in build_parser().format_help()


def test_config_file_sits_between_defaults_and_flags(tmp_path):
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"model": {"n_layers": 3, "moe": {"num_experts": 6, "seq_aux": True}},
                                    "train": {"steps": 5, "seq_len": 2000}}))
    m, t = configs("--config", str(run_json), "--moe.num-experts", "4", "--model.d-model", "64")
    assert (m.n_layers, m.moe.num_experts, m.moe.seq_aux, m.d_model, m.moe.d_model) == (3, 4, True, 64, 64)
    assert (t.steps, m.max_seq_len) == (5, 2000)  # max_seq_len is raised to seq_len


def test_init_from_applies_training_only_fields_and_refuses_the_rest():
    init = default_model_config(300)

    def run(*argv: str):
        return resolve_init_configs(build_parser().parse_args(["--init-from", "SRC", *argv]), init)

    m, t = run("--moe.seq-aux", "--aux-loss-coef", "0.1", "--moe.expert-impl", "loop", "--model.max-seq-len",
               "4096", "--seq-len", "2048")
    assert (m.moe.seq_aux, m.moe.aux_loss_coef, m.moe.expert_impl, m.max_seq_len) == (True, 0.1, "loop", 4096)
    assert m.replace(moe=init.moe, max_seq_len=init.max_seq_len) == init and t.vocab_size == 300
    with pytest.raises(ValueError, match="--tie-embeddings, --top-k, --moe.n-group would change"):
        run("--moe.top-k", "1", "--moe.n-group", "2", "--no-tie-embeddings")
    with pytest.raises(ValueError, match=r"--model.head-dim, --top-k, --dense would change its architecture"):
        run("--model.head-dim", "16", "--top-k", "1", "--dense")
    with pytest.raises(ValueError, match="--seq-len 2048 exceeds the model's max_seq_len 1024"):
        run("--seq-len", "2048")
