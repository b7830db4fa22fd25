"""The memory estimate a run is checked against before it starts: close to a measured peak, and a run that
cannot fit is refused with the number instead of being killed by the OOM killer."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from moekit.cli.train import default_model_config, main
from moekit.config import TrainConfig
from moekit.train.memory import available_bytes, estimate_training_memory

_PROBE = textwrap.dedent("""
    import json, torch
    from moekit.cli.train import default_model_config
    from moekit.config import TrainConfig
    from moekit.infer.memory import PeakRSS, rss
    from moekit.nn.transformer import MoETransformer
    from moekit.train.loop import build_optimizer
    torch.set_num_threads(1)
    B, T, V = 8, 1024, 4096
    model = MoETransformer(default_model_config(V).replace(max_seq_len=T))
    opt = build_optimizer(model, TrainConfig(batch_size=B, seq_len=T, vocab_size=V))
    x = torch.randint(0, V, (B, T))
    out = model(x[:1, :8], labels=x[:1, :8]); (out.loss + out.aux_loss).backward()
    opt.zero_grad(set_to_none=True)  # code paths warm, no gradients held
    weights = rss()["anon"]
    with PeakRSS(0.002) as peak:  # anonymous memory only: the mapped libraries' pages vary from run to run
        out = model(x, labels=x); (out.loss + out.aux_loss).backward(); opt.step()
    print(json.dumps({"peak_over_weights": peak.peak_anon - weights}))
""")


def test_the_estimate_is_within_a_third_of_a_measured_training_step():
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=240, check=True)
    measured = json.loads(res.stdout)["peak_over_weights"]
    m, t = default_model_config(4096).replace(max_seq_len=1024), TrainConfig(batch_size=8, seq_len=1024)
    est = estimate_training_memory(m, t)
    expected = est.total_bytes - 4 * est.params  # the weights were resident before the step
    assert 0.75 < measured / expected < 1.33, (measured, expected)


def test_a_run_that_cannot_fit_is_refused_with_the_number(tmp_path, capsys):
    avail = available_bytes()
    assert avail is not None  # Linux: /proc/meminfo
    assert main(["--out", str(tmp_path / "run"), "--seq-len", "100000", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: this run needs about ") and " GiB" in err
    assert "--batch-size 16 x --seq-len 100000" in err and "lower --batch-size or --seq-len" in err
    assert not (tmp_path / "run").exists()  # refused before any data or file
    est = estimate_training_memory(default_model_config().replace(max_seq_len=100000),
                                   TrainConfig(seq_len=100000))
    assert est.logits_bytes > 3 * 16 * 100000 * 4096 * 4  # the logits alone are ~80 GB
