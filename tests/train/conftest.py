"""A tiny corpus, the tiny-model training flags, and helpers to read a run's metrics.

Every run uses one CPU thread: on a shared 2-core box torch's default threading is ~50x slower for
these shapes, and bit-identity comparisons need the same thread count in every process.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TINY_MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--experts", "4", "--top-k", "2",
              "--router", "topk", "--expert-hidden", "64", "--vocab-size", "300", "--seq-len", "32",
              "--batch-size", "4", "--eval-interval", "5", "--eval-batches", "2", "--ckpt-interval", "5",
              "--threads", "1"]

_NAMES = ["x", "y", "value", "items", "total", "result", "key", "data", "node", "count"]
_FUNCS = ["parse", "load", "update", "merge", "split", "render", "check", "build"]


def python_like_text(n_funcs: int, seed: int = 0) -> str:
    """Small, repetitive Python-looking functions: easy to tokenize and to start learning."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_funcs):
        f, a, b = rng.choice(_FUNCS), rng.choice(_NAMES), rng.choice(_NAMES)
        out.append(f"def {f}_{a}({a}, {b}):\n"
                   f"    \"\"\"{f.capitalize()} the {a} with {b}.\"\"\"\n"
                   f"    if {a} is None:\n        return {b}\n"
                   f"    for {b} in range({rng.randint(2, 9)}):\n        {a} = {a} + {b}\n"
                   f"    return {a}\n")
    return "\n".join(out)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one CPU thread (the one_thread fixture of tests/conftest.py)."""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """One text file of ~25 KB (a few thousand tokens at V=300)."""
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text(python_like_text(150))
    return path


@pytest.fixture(scope="session")
def flags(corpus):
    """flags(out, steps, *extra): the training CLI arguments of a tiny run on the corpus."""

    def make(out: Path, steps: int, *extra: str, data: Path | None = None) -> list[str]:
        return ["--data", str(data or corpus), "--out", str(out), *TINY_MODEL, "--steps", str(steps), *extra]

    return make


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def metrics():
    return read_metrics


@pytest.fixture(scope="session")
def losses():
    """losses(run_dir) -> {step: (loss, aux_loss, val_loss or None)} from metrics.jsonl."""

    def read(run_dir: Path) -> dict[int, tuple]:
        return {r["step"]: (r["loss"], r["aux_loss"], r.get("val_loss")) for r in read_metrics(run_dir)}

    return read


@pytest.fixture(scope="session")
def python_text():
    """python_text(n_funcs, seed) -> str: the generator of the corpus, for other data layouts."""
    return python_like_text
