"""`moekit generate RUN_DIR`: greedy is deterministic, sampling is reproducible by seed, top-k / top-p
narrow the choice, and the text equals what the library produces from the same run."""
from __future__ import annotations

import json

import pytest
import torch

from moekit.cli.generate import main as generate_main
from moekit.cli.main import main as moekit_main
from moekit.cli.train import main as train_main
from moekit.data import decode, encode
from moekit.infer import generate, load_run

PROMPT = "def parse_"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, flags):
    run = tmp_path_factory.mktemp("gen") / "run"
    assert train_main(flags(run, 30, "--lr", "1e-2", "--warmup-steps", "5", "--eval-interval", "30")) == 0
    return run


def test_the_run_learned(run_dir):
    """30 steps at lr 1e-2 on the tiny corpus: both losses fall well below their start (ln 300 = 5.7)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] > 5.0
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0 and recs[-1]["val_loss"] < recs[0]["loss"] - 1.0


def _gen(capsys, run_dir, *args):
    assert generate_main([str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "24", "--threads", "1",
                          "--no-stop-at-eot", *args]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(PROMPT)
    return out.out


def test_greedy_is_deterministic_and_equals_the_library(run_dir, capsys):
    a = _gen(capsys, run_dir, "--temperature", "0")
    b = _gen(capsys, run_dir, "--temperature", "0", "--seed", "123")  # the seed does not matter
    assert a == b
    model, tok = load_run(run_dir)
    ids = generate(model, torch.tensor([encode(tok, PROMPT)]), 24, temperature=0)
    assert a == PROMPT + decode(tok, ids[0, len(encode(tok, PROMPT)):].tolist()) + "\n"


def test_sampling_is_reproducible_by_seed(run_dir, capsys):
    a = _gen(capsys, run_dir, "--seed", "1", "--temperature", "1.0")
    assert a == _gen(capsys, run_dir, "--seed", "1", "--temperature", "1.0")
    assert a != _gen(capsys, run_dir, "--seed", "2", "--temperature", "1.0")
    assert "seed 1" in _gen_err(capsys, run_dir, "--seed", "1")


def _gen_err(capsys, run_dir, *args):
    argv = [str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "4", "--threads", "1", *args]
    assert generate_main(argv) == 0
    return capsys.readouterr().err


def test_top_k_and_top_p_restrict_the_choice(run_dir, capsys):
    """A support of one token is the greedy text, whatever the seed and temperature."""
    greedy = _gen(capsys, run_dir, "--temperature", "0")
    for seed in ("1", "2"):
        assert _gen(capsys, run_dir, "--seed", seed, "--temperature", "2.0", "--top-k", "1") == greedy
        assert _gen(capsys, run_dir, "--seed", seed, "--temperature", "2.0", "--top-p", "1e-9") == greedy
    # a wider support samples something else at a high temperature
    assert _gen(capsys, run_dir, "--seed", "1", "--temperature", "2.0", "--top-k", "50") != greedy


def test_registered_in_the_moekit_entry_point(run_dir, capsys):
    assert moekit_main(["generate", str(run_dir), "--max-new-tokens", "5", "--temperature", "0",
                        "--threads", "1"]) == 0
    assert capsys.readouterr().err.count("new tokens") == 1


def test_errors_are_reported(run_dir, tmp_path, capsys):
    assert generate_main([str(tmp_path), "--threads", "1"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert generate_main([str(run_dir), "--max-new-tokens", "100000", "--threads", "1"]) == 1
    assert "max_seq_len" in capsys.readouterr().err
    assert generate_main([str(run_dir), "--top-p", "0", "--threads", "1"]) == 1
    assert "top_p=0" in capsys.readouterr().err


def test_an_hf_model_directory_generates_the_same_text(run_dir, tmp_path, capsys):
    """Through moekit.hf.load_any: the run written as an HF (Mixtral) checkpoint plus its tokenizer."""
    import moekit.hf as hf
    model, _ = load_run(run_dir)
    hf_dir = hf.save_pretrained(model, tmp_path / "hf")
    (hf_dir / "tokenizer.json").write_bytes((run_dir / "tokenizer.json").read_bytes())
    assert _gen(capsys, hf_dir, "--temperature", "0") == _gen(capsys, run_dir, "--temperature", "0")
    assert _gen(capsys, hf_dir, "--seed", "4") == _gen(capsys, run_dir, "--seed", "4")


def test_compile_flag_gives_the_same_greedy_text(run_dir, capsys):
    """--compile decodes through one compiled graph per step: the same greedy text; the compile time is
    reported apart from the tokens/s; with the experts kept on disk it is refused with the way out."""
    eager = _gen(capsys, run_dir, "--temperature", "0")
    assert generate_main([str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "24", "--threads", "1",
                          "--no-stop-at-eot", "--temperature", "0", "--compile"]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert out.out == eager
    assert "decode step compiled in" in out.err and "tokens/s" in out.err
    assert generate_main([str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "4", "--compile",
                          "--expert-memory", "all"]) == 1
    assert "--compile decodes with every expert resident" in capsys.readouterr().err
