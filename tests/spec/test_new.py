"""`moekit new`: a preset's dimensions as a sharded run directory that loads like any run."""
from __future__ import annotations

import json

import torch

from moekit.cli.main import COMMANDS
from moekit.data.tokenizer import load_tokenizer
from moekit.rundir import MODEL_INDEX_FILE, RunDir
from moekit.spec import new as new_mod

TINY = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 64, "intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 5, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 600, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "initializer_range": 0.02}


def test_new_writes_sharded_run(tmp_path, monkeypatch):
    monkeypatch.setattr("moekit.spec.presets.get_preset", lambda name: dict(TINY))
    out = new_mod.write_random_model("tiny", tmp_path / "run", layers=3, dtype="bfloat16", seed=1, log=lambda m: None)
    index = json.loads((out / MODEL_INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) == 3 + 2  # embedding, one per layer, norm + head
    model = RunDir(out).load_model()
    assert model.config.n_layers == 3 and model.config.moe.num_experts == 4
    assert model.embed.weight.dtype == torch.bfloat16
    w = model.layers[0].ffn.experts.w_up.float()
    assert abs(w.std().item() - model.config.init_std) < 0.2 * model.config.init_std
    assert torch.equal(model.layers[0].attn_norm.weight.float(), torch.ones(64))
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() <= model.config.vocab_size
    again = new_mod.write_random_model("tiny", tmp_path / "again", layers=3, dtype="bfloat16", seed=1,
                                       log=lambda m: None)
    assert torch.equal(RunDir(again).load_model().layers[2].ffn.experts.w_down, model.layers[2].ffn.experts.w_down)
    assert "new" in COMMANDS
