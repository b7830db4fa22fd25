"""Memory bound, measured in a fresh process: a generated model whose routed experts are 4x the budget runs
with anonymous RSS growth <= non-expert bytes + budget + 64 MiB, (pread path) file-backed RSS growth
<= the memory-mapped non-expert weights + 32 MiB, and the experts' pages not kept in the page cache."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.spec import new as new_mod

# OLMoE's layout at a size a test can write: 4 layers x 16 experts of 1.5 MiB (fp32) = 96 MiB of experts
SMALL_OLMOE = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 256,
               "intermediate_size": 512, "num_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1024,
               "max_position_embeddings": 256, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.02}
EXPERTS = 4 * 16 * 3 * 256 * 512 * 4
BUDGET = EXPERTS // 4

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from moekit.infer.memory import PeakRSS, cached_bytes, rss
from moekit.infer.store import expert_ranges
from moekit.infer.offload import load_offloaded
from moekit.infer.generate import generate
path, budget = sys.argv[1], int(sys.argv[2])
# warm-up: the code pages of torch's kernels and of every module on this path are file-backed RSS too, and
# how many a fresh venv maps first is not the experts' doing; run once, unmap, then take the base
with torch.no_grad():
    om = load_offloaded(path, budget, prefetch=True)
    generate(om.model, torch.zeros(1, 8, dtype=torch.long), 2, temperature=0)
    om.close()
    del om
import gc; gc.collect()
base = rss()
with PeakRSS(0.002) as peak, torch.no_grad():
    om = load_offloaded(path, budget, prefetch=True)
    om.cache.store.drop_page_cache()
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    generate(om.model, ids, 24, temperature=0)
    st = om.stats()
    cached = cached_bytes(expert_ranges(om.cache.store))
    om.close()
print(json.dumps({"base_anon": base["anon"], "base_file": base["file"], "peak_anon": peak.peak_anon,
                  "peak_file": peak.peak_file, "non_expert": om.non_expert_bytes, "bytes_read": st["bytes_read"],
                  "slots": st["slots_allocated"], "expert_page_cache": cached}))
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr("moekit.spec.presets.get_preset", lambda name: dict(SMALL_OLMOE))
    out = tmp_path_factory.mktemp("gen") / "small-olmoe"
    new_mod.write_random_model("small-olmoe", out, dtype="float32", seed=0, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_rss_bound_in_subprocess(generated):
    r = subprocess.run([sys.executable, "-c", CHILD, str(generated), str(BUDGET)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["bytes_read"] > 0 and m["slots"] <= BUDGET // (3 * 256 * 512 * 4)
    assert m["peak_anon"] - m["base_anon"] <= m["non_expert"] + BUDGET + 64 * 2**20, m
    assert m["peak_file"] - m["base_file"] <= m["non_expert"] + 32 * 2**20, m
    # pread + POSIX_FADV_DONTNEED (and no readahead): the experts read leave little in the page cache
    assert m["expert_page_cache"] <= 16 * 2**20 < m["bytes_read"], m  # edge pages of matrices, fault-around
