"""Start-up cost: importing moekit and its command line does not import torch's compiler stack
(torch._dynamo alone is ~1.2 s, paid by every `moekit` command before it does anything); the routers that
need it for their host-side steps pull it in when they are built."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import moekit, moekit.cli.main, moekit.infer, moekit.model, moekit.nn, moekit.serve.engine, moekit.train.loop
print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
from moekit.config import MoEConfig
from moekit.nn.moe import MoELayer
MoELayer(MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=1, router="base"))
print("torch._dynamo" in sys.modules)
"""


def test_importing_moekit_leaves_the_compiler_unloaded():
    out = subprocess.run([sys.executable, "-c", CHECK], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
