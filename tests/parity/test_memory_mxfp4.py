"""Peak memory of loading an MXFP4 gpt-oss checkpoint: the experts are dequantized one expert at a time
into their final storage, so the peak stays within 1.1x the loaded model plus one dequantized expert
tensor, measured in a fresh process (test_memory explains why from VmHWM). The probe first loads a tiny
checkpoint of the same kind, so the code that loading imports lazily is in the baseline, then resets
VmHWM (``/proc/self/clear_refs``) before the measured load."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from moekit.hf import config_from_hf
from moekit.hf.adapter import save_entries
from moekit.hf.arch_gpt_oss import ADAPTER
from moekit.model import MoETransformer

MAX_RATIO = 1.1
PROBE = """
import gc, json, sys
import torch
from moekit.hf import from_pretrained

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

torch.set_num_threads(1)
from_pretrained(sys.argv[2])
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmHWM")
model = from_pretrained(sys.argv[1])
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM"), "weights_bytes": size}))
"""
HF = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": 1024, "hidden_size": 512,
    "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 64, "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 64,
    "sliding_window": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0},
    "quantization_config": {"quant_method": "mxfp4"}, "tie_word_embeddings": False,
}


def _checkpoint(path, hf):
    """Random fp32 tensors and random MXFP4 experts, in the published layout."""
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        meta = MoETransformer(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape, dtype, _ in save_entries(ADAPTER, cfg, hf, meta):
        if name.endswith("_scales"):  # 2**-8 .. 2**-1: weights of a sensible size
            tensors[name] = torch.randint(119, 127, shape, generator=g, dtype=torch.uint8)
        elif dtype == torch.uint8:
            tensors[name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            tensors[name] = torch.randn(shape, generator=g) * 0.02
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf))
    return cfg


def test_mxfp4_peak_rss(tmp_path):
    cfg = _checkpoint(tmp_path / "mxfp4", HF)  # ~200 MB once dequantized
    tiny = {**HF, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64, "head_dim": 8}
    _checkpoint(tmp_path / "tiny", tiny)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "mxfp4"), str(tmp_path / "tiny")], capture_output=True,
        text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    expert_tensor = 2 * cfg.moe.d_hidden * cfg.d_model * 4  # one expert's gate_up rows, dequantized to fp32
    bound = r["weights_bytes"] + expert_tensor
    ratio = (r["peak_kb"] - r["base_kb"]) * 1024 / bound
    print(f"mxfp4: model {r['weights_bytes'] / 2**20:.0f} MiB, peak RSS above baseline "
          f"{(r['peak_kb'] - r['base_kb']) / 1024:.0f} MiB = {ratio:.3f}x (model + one expert tensor)")
    assert r["weights_bytes"] > 180 * 2**20
    assert ratio <= MAX_RATIO, f"peak RSS {ratio:.3f}x (the loaded model + one dequantized expert tensor)"
