"""One error convention across commands: `moekit COMMAND: error: <one line>` naming the file and the fix,
exit code 2 for a command line that cannot work and 1 for a run that failed, no traceback."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from moekit.cli.train import main as train_main


def _moekit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True,
                          timeout=180, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, flags):
    path = tmp_path_factory.mktemp("errors") / "run"
    assert train_main(flags(path, 2)) == 0
    return path


def _damaged(run, tmp_path, name, content=b'{"version": "1.0", "trunc'):
    bad = shutil.copytree(run, tmp_path / "bad")
    (bad / name).write_bytes(content)
    return bad


def _error_line(res, prog, code) -> str:
    """The one `PROG: error: ...` line of a command that exited with ``code`` and no traceback."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("command", [("generate", "--max-new-tokens", "2"), ("inspect", "--tokens", "64"),
                                     ("convert", "{out}")])
def test_a_damaged_tokenizer_is_named(run, tmp_path, command):
    bad = _damaged(run, tmp_path, "tokenizer.json")
    name, *rest = command
    rest = [a.format(out=tmp_path / "hf") for a in rest]
    res = _moekit(name, bad, *rest)
    line = _error_line(res, f"moekit {name}", 1)
    assert f"{bad / 'tokenizer.json'}: cannot be read as a tokenizer" in line and "copy it again" in line


def test_a_damaged_train_config_on_resume_is_named(run, tmp_path):
    bad = _damaged(run, tmp_path, "train_config.json", b"{\"steps\": 4,")
    res = _moekit("train", "--resume", bad, "--steps", "4")
    line = _error_line(res, "moekit train", 1)
    assert f"{bad / 'train_config.json'}: not valid JSON" in line and "damaged" in line


@pytest.mark.parametrize("args, prog, says", [
    (["bench"], "moekit bench", ["name a benchmark (layer: "]),
    (["train", "--top-k", "99"], "moekit train", ["top_k=99 must be in [1, num_experts=8]"]),
    (["spec", "{empty}"], "moekit spec", ["is empty; expected a model's config.json"]),
])
def test_usage_errors_exit_2(tmp_path, args, prog, says):
    empty = tmp_path / "config.json"
    empty.write_text("")
    res = _moekit(*[a.format(empty=empty) for a in args], cwd=tmp_path)
    line = _error_line(res, prog, 2)
    assert all(s in line for s in says), line


def test_no_command_is_usage_and_help_into_a_closed_pipe_is_quiet():
    res = _moekit()
    assert res.returncode == 2 and res.stderr.startswith("usage: moekit COMMAND")
    for args in (["-h"], ["train", "-h"]):
        proc = subprocess.Popen([sys.executable, "-m", "moekit", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # `| head` that has already exited
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ctrl_c_while_preparing_data_is_one_line_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "train", "--out", str(out), "--threads", "1",
                             "--max-data-bytes", "4000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (out / "data").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # inside the corpus read / tokenizer training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "moekit train: interrupted" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "model.safetensors").exists()
