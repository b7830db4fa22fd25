"""`moekit convert` both ways, and moekit-native models written as the HF architecture that fits."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_parity import (
    COMMON,
    TOL,
    batch,
    build_hf,
    hf_greedy,
    hf_logits,
    max_diff,
    moekit_greedy,
    moekit_logits,
    randomize,
    transformers,
)
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.hf import load_any, save_pretrained
from moekit.model import ModelConfig, MoETransformer
from moekit.rundir import save_weights

D = 48


def run_dir(path, cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    """A moekit run directory as train writes it: config.json, model.safetensors, tokenizer.json."""
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    randomize(model, seed)
    path.mkdir(parents=True)
    cfg.to_json(path / "config.json")
    save_weights(model, path / "model.safetensors")
    vocab = {f"t{i}": i for i in range(cfg.vocab_size - 1)} | {"<unk>": cfg.vocab_size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return model


def mixtral_like(**kw) -> ModelConfig:
    moe = MoEConfig(d_model=D, d_hidden=32, num_experts=4, top_k=2, **kw.pop("moe", {}))
    return ModelConfig(
        **{
            "vocab_size": 160,
            "d_model": D,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 128,
            "rope_theta": 10000.0,
            "moe": moe,
            **kw,
        }
    )


def test_moekit_run_dir_to_mixtral_and_back(tmp_path, capsys):
    model = run_dir(tmp_path / "run", mixtral_like())
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "moekit run directory -> Hugging Face mixtral" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # transformers runs it as moekit does
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask = batch(160)
    assert max_diff(hf_logits(ref, ids, mask), moekit_logits(model, ids, mask), mask) <= TOL
    assert torch.equal(hf_greedy(ref, ids, mask), moekit_greedy(model, ids, mask))
    # and back to a moekit run directory, bit for bit
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run2")]) == 0
    back, tok = load_any(tmp_path / "run2")
    assert tok is not None and tok.token_to_id("t5") == 5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_qk_norm_model_is_written_as_qwen3_moe(tmp_path):
    model = run_dir(tmp_path / "run", mixtral_like(qk_norm=True, moe={"norm_topk": False}))
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_moe"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask = batch(160)
    assert max_diff(hf_logits(ref, ids, mask), moekit_logits(model, ids, mask), mask) <= TOL


def test_inexpressible_model_is_refused(tmp_path, capsys):
    cfg = mixtral_like(moe={"router": "sigmoid_bias", "num_shared_experts": 1})
    model = run_dir(tmp_path / "run", cfg)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "cannot be written as mixtral: router='sigmoid_bias'" in err
    assert "deepseek_v3: DeepSeek-V3 needs multi-head latent attention" in err
    assert not (tmp_path / "hf" / "config.json").exists()
    with pytest.raises(ValueError, match="cannot be written as mixtral"):
        save_pretrained(model, tmp_path / "hf2", model_type="mixtral")
    capacity = run_dir(tmp_path / "run_cap", mixtral_like(moe={"capacity_factor": 1.25}))
    with pytest.raises(ValueError, match="capacity_factor=1.25 drops tokens"):
        save_pretrained(capacity, tmp_path / "hf3")


def test_hf_to_moekit_to_hf_keeps_the_architecture(tmp_path):
    cfg = transformers.Ernie4_5_MoeConfig(
        **COMMON,
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=24,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    )
    build_hf(cfg, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "moekit"
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2"), "--max-shard-size", "30KB"]) == 0
    out = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert out["model_type"] == "ernie4_5_moe" and out["pad_token_id"] == 0
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())["weight_map"]
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(index) == set(original)
    shards = {f: load_file(str(tmp_path / "hf2" / f)) for f in set(index.values())}
    for k, v in original.items():  # the interleaved RoPE rows come back in their original order
        torch.testing.assert_close(shards[index[k]][k], v, rtol=0, atol=0, msg=k)


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    run_dir(tmp_path / "run", mixtral_like())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 1
    assert "--overwrite" in capsys.readouterr().err
