"""`moekit train --init-from PATH` (a moekit run or an HF model directory) and `moekit generate` on runs
that carry an HF model's tokenizer.

A run initialised from a moekit run starts exactly at its weights (same data tokens, same loss before
the first update); from a tiny HF Mixtral it trains with the model's own tokenizer and generates.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.cli.generate import main as generate_main
from moekit.cli.main import main as moekit_main
from moekit.cli.train import main as train_main
from moekit.config import ModelConfig, TrainConfig
from moekit.data import TokenDataset, prepare_data
from moekit.nn.transformer import MoETransformer
from moekit.train.init import load_init, load_init_state
from moekit.train.runtime import evaluate

TRAIN = ["--seq-len", "32", "--batch-size", "4", "--eval-interval", "5", "--eval-batches", "2",
         "--ckpt-interval", "5", "--threads", "1"]


def _weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def src_run(tmp_path_factory, flags):
    run = tmp_path_factory.mktemp("init") / "src"
    assert train_main(flags(run, 5)) == 0
    return run


def test_init_from_a_moekit_run_starts_at_its_weights(src_run, corpus, tmp_path, metrics):
    run = tmp_path / "run"
    assert train_main(["--data", str(corpus), "--out", str(run), "--init-from", str(src_run), "--steps", "3",
                       "--lr", "1e-3", *TRAIN]) == 0
    cfg = ModelConfig.from_json(run / "config.json")
    assert cfg == ModelConfig.from_json(src_run / "config.json")
    # the same tokenizer, so the same tokens
    assert (run / "tokenizer.json").read_bytes() == (src_run / "tokenizer.json").read_bytes()
    assert (run / "data" / "val.bin").read_bytes() == (src_run / "data" / "val.bin").read_bytes()
    assert json.loads((run / "init_from.json").read_text())["source"] == "moekit run"
    # step 0 is the source: its val loss, and the loss of the first batch before the first update
    tcfg = TrainConfig.from_json(run / "train_config.json")
    model = MoETransformer(cfg)
    model.load_state_dict(load_init_state(src_run, cfg))
    src_val = [r["val_loss"] for r in metrics(src_run) if "val_loss" in r][-1]
    assert evaluate(model, TokenDataset(run / "data" / "val.bin"), tcfg) == pytest.approx(src_val, rel=1e-6)
    x, y = TokenDataset(run / "data" / "train.bin").get_batch(4, 32, torch.Generator().manual_seed(tcfg.seed))
    with torch.no_grad():
        first_loss = float(model.train()(x, labels=y).loss)
    assert metrics(run)[0]["step"] == 1 and metrics(run)[0]["loss"] == pytest.approx(first_loss, rel=1e-6)
    # and it trained
    assert any(not torch.equal(v, _weights(src_run)[k]) for k, v in _weights(run).items())
    # a resume encodes with the run's (copied) tokenizer again: the token files are reused, not rebuilt
    before = (run / "data" / "train.bin").stat().st_mtime_ns
    assert train_main(["--resume", str(run), "--steps", "4", "--threads", "1"]) == 0
    assert (run / "data" / "train.bin").stat().st_mtime_ns == before
    assert metrics(run)[-1]["step"] == 4


def test_init_from_refuses_architecture_flags_and_mismatched_tokenizers(src_run, corpus, tmp_path, capsys):
    def run(*args: str, code: int = 1) -> str:
        assert train_main(["--data", str(corpus), "--out", str(tmp_path / "out"), "--steps", "2", *TRAIN,
                           *args]) == code
        return capsys.readouterr().err

    # flags that cannot apply are usage errors (2); a source model that cannot be used is a runtime one (1)
    assert "--experts, --dense would change its architecture" in run("--init-from", str(src_run), "--experts",
                                                                     "8", "--dense", code=2)
    assert "--vocab-size 200 differs from the model's vocab_size 300" in run("--init-from", str(src_run),
                                                                             "--vocab-size", "200", code=2)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src_run / name, bare / name)
    assert "no tokenizer.json" in run("--init-from", str(bare))
    big = {f"t{i}": i for i in range(400)}  # ids 0..399 for a 300-token model
    Tokenizer(models.WordLevel(big, unk_token="t0")).save(str(bare / "tokenizer.json"))
    assert "token ids up to 399 but the model's vocab_size is 300" in run("--init-from", str(bare))
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------- Hugging Face models


def _bpe(text: str, specials: list[str], vocab_size: int = 280) -> Tokenizer:
    """A small byte-level BPE, as a Hugging Face model would ship it (specials first: ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return tok


def _hf_mixtral(path, tok: Tokenizer, *, eos: int | None, bos: int | None, zero_final_norm: bool = False):
    """A tiny random Mixtral saved with transformers' save_pretrained, plus ``tok`` as tokenizer.json."""
    cfg = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, eos_token_id=eos,
                                     bos_token_id=bos, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    if zero_final_norm:  # every logit 0: greedy picks id 0 at every step
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return model


def test_init_from_a_hugging_face_mixtral_trains_and_generates(corpus, python_text, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    ref = _hf_mixtral(hf_dir, _bpe(python_text(150), ["<|endoftext|>"]), eos=0, bos=0)
    run = tmp_path / "run"
    assert train_main(["--data", str(corpus), "--out", str(run), "--init-from", str(hf_dir), "--steps", "3",
                       "--lr", "1e-3", *TRAIN]) == 0
    assert (run / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert json.loads((run / "hf_config.json").read_text())["model_type"] == "mixtral"
    cfg = ModelConfig.from_json(run / "config.json")
    assert (cfg.vocab_size, cfg.d_model, cfg.moe.num_experts, cfg.tie_embeddings) == (300, 32, 4, False)
    # the first step's loss is transformers' loss of the same batch
    x, y = TokenDataset(run / "data" / "train.bin").get_batch(4, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(input_ids=x).logits
    expected = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 300), y.reshape(-1)))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
    capsys.readouterr()
    assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0",
                          "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_a_model_tokenizer_without_eot_separates_documents_by_its_eos(python_text, tmp_path):
    hf_dir = tmp_path / "hf"
    tok = _bpe(python_text(150), ["</s>", "<s>"])
    (hf_dir).mkdir()
    tok.save(str(hf_dir / "tokenizer.json"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"m{i}.py").write_text(python_text(3, seed=i))

    def build(name):
        return prepare_data(tmp_path / name, docs, tokenizer_path=hf_dir / "tokenizer.json", val_fraction=0.25)

    def count(info, id_):
        return int((TokenDataset(info.train_path).tokens_N == id_).sum())

    none = build("none")  # neither tokenizer_config.json nor config.json: no separator
    assert none.eot_id is None and count(none, 0) == 0 and none.vocab_size == tok.get_vocab_size()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mixtral", "eos_token_id": [0, 1]}))
    by_config = build("config")
    assert by_config.eot_id == 0 and count(by_config, 0) == by_config.train_docs > 0
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))  # wins over config.json
    by_tok_config = build("config")
    assert not by_tok_config.reused and by_tok_config.eot_id == 1 and count(by_tok_config, 1) > 0
    assert build("config").reused  # the same tokenizer and separator: reused


def test_generate_on_a_converted_hf_model_without_eot_stops_at_its_eos(python_text, tmp_path, capsys):
    """`moekit convert` keeps the HF tokenizer (no <|endoftext|>) and config (eos 0) beside a moekit
    config.json: generate loads it through moekit.hf and --stop-at-eot stops at the eos id."""
    hf_dir = tmp_path / "hf"
    _hf_mixtral(hf_dir, _bpe(python_text(150), ["</s>", "<s>"]), eos=0, bos=1, zero_final_norm=True)
    run = tmp_path / "run"
    assert moekit_main(["convert", str(hf_dir), str(run)]) == 0
    assert (run / "hf_config.json").is_file()
    capsys.readouterr()

    def gen(*args):
        assert generate_main([str(run), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0",
                              "--threads", "1", *args]) == 0
        return capsys.readouterr()

    stopped = gen()
    assert stopped.out == "def \n" and "0 new tokens" in stopped.err
    assert gen("--no-stop-at-eot").out == "def " + "</s>" * 5 + "\n"
    # and a run initialised from it keeps generating the same way
    init = load_init(run)
    assert init.separator == 0 and init.hf_config["eos_token_id"] == 0
