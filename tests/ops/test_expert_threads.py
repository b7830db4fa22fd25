"""The expert-parallel CPU loop: same numbers as the serial loop, every run once, threads restored."""
from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.ops.expert_threads import MIN_ROWS_FOR_THREADS, _balanced_chunks, expert_runs, for_each_expert


def test_runs_skip_empty_experts_and_cover_all_rows():
    runs = expert_runs([3, 0, 2, 0, 5])
    assert runs == [(0, slice(0, 3)), (2, slice(3, 5)), (4, slice(5, 10))]


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_balanced_chunks_keep_order_and_every_run(parts):
    counts = [7, 1, 0, 30, 2, 2, 9, 4, 0, 11]
    runs = expert_runs(counts)
    chunks = _balanced_chunks(runs, parts)
    assert [r for c in chunks for r in c] == runs  # consecutive, each run exactly once
    sizes = [sum(sl.stop - sl.start for _, sl in c) for c in chunks]
    assert max(sizes) <= sum(counts) / parts + 30  # no chunk exceeds its share by more than one run


def test_threads_restored_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def boom(e, sl):
            raise RuntimeError("expert failed")

        with pytest.raises(RuntimeError, match="expert failed"):
            for_each_expert([MIN_ROWS_FOR_THREADS, MIN_ROWS_FOR_THREADS], boom, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_threaded_fused_layer_matches_loop_reference(activation):
    """Enough rows for the threaded path: outputs and every gradient equal the readable loop."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = MoEConfig(d_model=16, d_hidden=24, num_experts=8, top_k=2, activation=activation)
        fused = MoELayer(cfg).double()
        loop = MoELayer(cfg.replace(expert_impl="loop")).double()
        loop.load_state_dict(fused.state_dict())
        x = torch.randn(2, MIN_ROWS_FOR_THREADS, 16, dtype=torch.float64, requires_grad=True)
        xl = x.detach().clone().requires_grad_(True)
        outs = []
        for layer, inp in ((fused, x), (loop, xl)):
            out = layer(inp)
            (out.output.square().sum() + out.aux_loss).backward()
            outs.append(out.output)
        torch.testing.assert_close(outs[0], outs[1])
        torch.testing.assert_close(x.grad, xl.grad)
        for (name, p), q in zip(fused.named_parameters(), loop.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        torch.set_num_threads(before)
