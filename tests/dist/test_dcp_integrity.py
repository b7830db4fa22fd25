"""DCP checkpoints on one process: sha256 digests checked at load, and a save interrupted between its renames.

No spawned processes: save_dcp / load_dcp without a process group, and the one-process resume of a
distributed run (DistributedRuntime without groups), in this process.
"""
from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from _run_workers import ckpt_config, ckpt_reference

from moekit.config import ParallelConfig
from moekit.nn.transformer import MoETransformer
from moekit.parallel import load_dcp, read_dcp_info, save_dcp
from moekit.rundir import CheckpointError, RunDir


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def test_save_records_a_sha256_per_file(tmp_path) -> None:
    import hashlib

    model, _ = ckpt_reference()
    save_dcp(tmp_path / "dcp", model, extra={"step": torch.tensor(5)}, info={"step": 5})
    info = read_dcp_info(tmp_path / "dcp")
    on_disk = {p.name for p in (tmp_path / "dcp").iterdir()} - {"moekit.json"}
    assert set(info["sha256"]) == on_disk and ".metadata" in on_disk
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((tmp_path / "dcp" / name).read_bytes()).hexdigest() == digest


def test_a_flipped_byte_is_named_and_nothing_is_loaded_or_written(tmp_path) -> None:
    model, _ = ckpt_reference()
    ckpt = tmp_path / "dcp"
    save_dcp(ckpt, model, extra={"step": torch.tensor(5)}, info={"step": 5})
    shard = next(ckpt.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    shard.write_bytes(bytes(raw))
    want = read_dcp_info(ckpt)["sha256"][shard.name]
    before = _files(ckpt)
    torch.manual_seed(999)
    other = MoETransformer(ckpt_config())
    weights = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_dcp(ckpt, other, extra={"step": torch.tensor(0)})
    msg = str(e.value)
    assert f"{shard}: sha256 " in msg and f"does not match {want}" in msg, msg
    got = msg.split("sha256 ", 1)[1].split(" ", 1)[0]
    assert len(got) == 64 and got != want
    assert all(torch.equal(v, weights[k]) for k, v in other.state_dict().items())  # nothing loaded
    assert _files(ckpt) == before  # nothing overwritten


def test_an_interrupted_rename_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    model, ids = ckpt_reference()
    ckpt = tmp_path / "run" / "dcp"
    save_dcp(ckpt, model, extra={"step": torch.tensor(1)}, info={"step": 1})
    with torch.no_grad():
        logits_1 = model(ids).logits
        for p in model.parameters():
            p.add_(0.5)
    real = pathlib.Path.rename

    def crash_before_the_second(self, target):
        if Path(target) == ckpt:  # dcp.tmp -> dcp: the new checkpoint's own rename
            raise KeyboardInterrupt("killed between the renames")
        return real(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", crash_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        save_dcp(ckpt, model, extra={"step": torch.tensor(2)}, info={"step": 2})
    monkeypatch.undo()
    assert not ckpt.exists() and (tmp_path / "run" / "dcp.old").is_dir()
    # readers take the previous checkpoint, whole: step 1's weights
    assert read_dcp_info(ckpt)["step"] == 1
    torch.manual_seed(999)
    fresh = MoETransformer(ckpt_config()).eval()
    assert int(load_dcp(ckpt, fresh, extra={"step": torch.tensor(0)})["step"]) == 1
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits_1)
    # a one-process --resume still finds the distributed checkpoint
    from moekit.cli.launch import make_runtime
    from moekit.train.distributed import DistributedRuntime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(make_runtime(ParallelConfig(), tmp_path / "run", resume=True, compare=False),
                      DistributedRuntime)
    # the next save completes and leaves no .old / .tmp behind
    save_dcp(ckpt, model, extra={"step": torch.tensor(3)}, info={"step": 3})
    assert read_dcp_info(ckpt)["step"] == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dcp"]
    assert json.loads((ckpt / "moekit.json").read_text())["step"] == 3
    assert RunDir(tmp_path / "run").has_dcp()
