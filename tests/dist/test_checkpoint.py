"""A DCP checkpoint saved with ep=4 loads with ep=2, on one process, and exports to one safetensors file."""
from __future__ import annotations

import torch
from _run_workers import ckpt_config, ckpt_reference

from moekit.nn.transformer import MoETransformer
from moekit.parallel import export_dcp_to_safetensors, load_dcp, read_dcp_info
from moekit.rundir import load_weights


def test_ep4_checkpoint_loads_with_ep2(world2) -> None:
    for rank, res in enumerate(world2["ranks"]):
        assert res["weights_equal"], f"rank {rank}: loaded weights differ from the saved model's slice"
        assert res["step"] == 3
        assert res["logits_err"] < 1e-5, res["logits_err"]


def test_ep4_checkpoint_loads_on_one_process(world4, ckpt_dir) -> None:
    assert read_dcp_info(ckpt_dir)["ep_size"] == 4
    ref, ids = ckpt_reference()
    torch.manual_seed(999)
    model = MoETransformer(ckpt_config()).eval()
    extra = load_dcp(ckpt_dir, model, extra={"step": torch.tensor(0)})
    assert int(extra["step"]) == 3
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_export_to_safetensors(world4, ckpt_dir, tmp_path) -> None:
    ref, ids = ckpt_reference()
    out = export_dcp_to_safetensors(ckpt_dir, tmp_path / "model.safetensors")
    torch.manual_seed(999)
    model = MoETransformer(ckpt_config()).eval()
    meta = load_weights(model, out)  # the single-process loader: same keys and shapes
    assert meta["step"] == "3"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_checkpoint_for_another_model_is_refused(world4, ckpt_dir) -> None:
    import pytest

    cfg = ckpt_config()
    model = MoETransformer(cfg.replace(moe=cfg.moe.replace(num_experts=4)))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_dcp(ckpt_dir, model)
