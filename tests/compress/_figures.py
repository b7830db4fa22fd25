"""The figures of the compress report on a trained run (not a test): python tests/compress/_figures.py RUN OUT.json.

Quantization: KL / top-1 / perplexity against the fp32 model on the validation split, for moekit's formats
and the independent Q8_0 / Q4_0 references of _reference.py; decode tokens/s at batch 1; pruning rows.
"""
from __future__ import annotations

import copy
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _reference import apply_reference, q4_0, q8_0

from moekit.compress.calib import calibration_batches, split_tokens
from moekit.compress.evaluate import compare_models, decode_tokens_per_s
from moekit.compress.prune import expert_scores, prune_model
from moekit.compress.quantize import QuantSpec, collect_hessians, quantize_model
from moekit.data import TokenDataset
from moekit.rundir import RunDir


def main(run_path: str, out_path: str, val_batches: int = 8, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    from moekit.runtime import configure

    configure()  # the CLI's malloc settings (moekit.runtime), as a `moekit` command runs
    run = RunDir(run_path)
    ref = run.load_model()
    val = TokenDataset(split_tokens(run, "val"))
    batches = list(val.iter_eval_batches(16, 128, val_batches))
    prompt = batches[0][0][:1, :16]
    res: dict = {"threads": threads, "dtype": "float32", "val_tokens": sum(y.numel() for _, y in batches), "rows": {}}

    def save():
        with open(out_path, "w") as f:
            json.dump(res, f, indent=2)

    hess = collect_hessians(copy.deepcopy(ref), calibration_batches(run, None, "train", max_tokens=16384))[0]
    variants = {
        "int8 gptq": lambda m: quantize_model(m, QuantSpec("int8"), hess),
        "int8 rtn": lambda m: quantize_model(m, QuantSpec("int8", method="rtn")),
        "Q8_0 reference": lambda m: apply_reference(m, q8_0),
        "int4 g32 gptq": lambda m: quantize_model(m, QuantSpec("int4", 32), hess),
        "int4 g32 rtn": lambda m: quantize_model(m, QuantSpec("int4", 32, method="rtn")),
        "Q4_0 reference": lambda m: apply_reference(m, q4_0),
        "int4 g64 gptq": lambda m: quantize_model(m, QuantSpec("int4", 64), hess),
        "int4 g128 gptq": lambda m: quantize_model(m, QuantSpec("int4", 128), hess),
    }
    for name, fn in variants.items():
        t0 = time.perf_counter()
        m = fn(copy.deepcopy(ref))
        res["rows"][name] = compare_models(ref, m, batches) | {"seconds": time.perf_counter() - t0}
        print(name, res["rows"][name], flush=True)
        save()
    # decode speed, interleaved rounds
    models = {"fp32": ref, "int8": quantize_model(copy.deepcopy(ref), QuantSpec("int8"), hess),
              "int4 g32": quantize_model(copy.deepcopy(ref), QuantSpec("int4", 32), hess)}
    tps: dict = {k: [] for k in models}
    for _ in range(3):
        for k, m in models.items():
            tps[k].append(decode_tokens_per_s(m, prompt, 64, repeats=2))
    res["decode_tokens_per_s"] = {k: max(v) for k, v in tps.items()}
    print(res["decode_tokens_per_s"], flush=True)
    save()
    # pruning
    res["prune"] = {}
    calib = list(calibration_batches(run, None, "val", max_tokens=32768))
    for method in ("frequency", "reap"):
        scores = expert_scores(ref, calib, method)
        for keep in (6, 4):
            p = prune_model(ref, scores, keep)
            row = compare_models(ref, p, batches) | p.num_params()
            row["decode_tokens_per_s"] = decode_tokens_per_s(p, prompt, 64, repeats=3)
            res["prune"][f"{method} keep {keep}"] = row
            print(method, keep, row, flush=True)
            save()
    res["prune"]["unpruned"] = ref.num_params() | {"decode_tokens_per_s": decode_tokens_per_s(ref, prompt, 64, 3)}
    save()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
