"""Peak memory of from_pretrained: a ~200 MB checkpoint loads with less than 1.3x its size on top of the
interpreter (after importing torch and moekit.hf), sharded or in one file, measured in a fresh process.

The peak is the process's high-water RSS. ru_maxrss cannot measure it in a child of pytest: Linux
carries the RSS the process had before execve (a fork of the large pytest process) into ru_maxrss,
so the probe reads VmHWM from /proc/self/status (reset by execve) and reports ru_maxrss beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moekit.config import MoEConfig
from moekit.hf import save_pretrained
from moekit.model import ModelConfig, MoETransformer

MAX_RATIO = 1.3
PROBE = """
import json, resource, sys
import torch
import moekit.hf
from moekit.hf import from_pretrained

def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

torch.set_num_threads(1)
base, base_maxrss = hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = from_pretrained(sys.argv[1])
peak, peak_maxrss = hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"base_kb": base, "peak_kb": peak, "weights_bytes": size, "base_maxrss_kb": base_maxrss,
                  "peak_maxrss_kb": peak_maxrss}))
"""


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """~200 MB of fp32 Mixtral-layout weights, saved in 48 MB shards and as one file."""
    cfg = ModelConfig(
        vocab_size=1024,
        d_model=512,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        max_seq_len=64,
        moe=MoEConfig(d_model=512, d_hidden=1024, num_experts=8, top_k=2),
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    root = tmp_path_factory.mktemp("big")
    save_pretrained(model, root / "sharded", max_shard_size="48MB")
    save_pretrained(model, root / "single", max_shard_size="1GB")
    return root


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_peak_rss_under_1_3x_weights(big_checkpoints, layout):
    path = big_checkpoints / layout
    assert len(list(path.glob("*.safetensors"))) == (5 if layout == "sharded" else 1)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (r["peak_kb"] - r["base_kb"]) * 1024 / r["weights_bytes"]
    print(
        f"{layout}: weights {r['weights_bytes'] / 2**20:.0f} MiB, peak RSS above baseline "
        f"{(r['peak_kb'] - r['base_kb']) / 1024:.0f} MiB = {ratio:.2f}x (ru_maxrss: "
        f"{r['base_maxrss_kb'] / 1024:.0f} -> {r['peak_maxrss_kb'] / 1024:.0f} MiB)"
    )
    assert r["weights_bytes"] > 180 * 2**20
    assert ratio < MAX_RATIO, f"peak RSS {ratio:.2f}x the weights ({layout})"
