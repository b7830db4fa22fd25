"""What a run directory holds: its file names, the one atomic write, configs, metrics, checkpoints, loading.

A run directory (``moekit train --out DIR``, ``moekit convert HF DIR``):
  config.json          ModelConfig ("model_type": "moekit")
  train_config.json    TrainConfig; a --resume rewrites it with that resume's overrides
  metrics.jsonl        one JSON record per logged step (a killed run may leave a torn last line)
  tokenizer.json       the tokenizer the data was encoded with
  model.safetensors    weights and buffers; metadata records the step      } a checkpoint,
  train_state.pt       optimizer + RNG states (tensors and plain containers  } committed by
                       only; loaded weights_only)                            } the manifest
  trainer_state.json   the manifest: step and the byte size of the two files above
  dcp/                 a distributed run's checkpoint instead (read by moekit.parallel.checkpoint)
  hf_config.json       the HF config of a model converted or initialised from Hugging Face
  init_from.json       the run started with --init-from (--resume encodes with its tokenizer.json again)
  data/                the prepared token files (moekit.data.prepare_data)
  ranks/rank<r>/       rank r > 0 of a distributed run: its own metrics

A comparison directory (``moekit train --compare --out DIR``) holds moe/ and dense/ (runs, or seed<s>/
runs), compare.json (the plan and the finished runs' rows, for --resume), summary.json and report/.

Every file is written by ``atomic_write``: 1. to a temporary name beside it, 2. fsync'ed, 3. renamed
over the target, 4. the directory fsync'ed. A reader sees the old file or the new one, never half.

A checkpoint save 1. writes both files to ``.tmp`` names (fsync'ed), 2. atomically replaces the manifest,
3. renames the ``.tmp`` files into place. A crash before 2 leaves the previous checkpoint whole; a crash
after 2 is rolled forward by ``load_checkpoint`` (the ``.tmp`` files of the manifest's step are renamed
into place).

Below data, train, infer, analysis and hf: they all read and write runs through it, and it imports
none of them (the model module is imported by the methods that build a model).
"""
from moekit.rundir.files import (
                                 COMPARE_FILE,
                                 CONFIG_FILE,
                                 DATA_DIR,
                                 DCP_DIR,
                                 HF_CONFIG_FILE,
                                 INIT_FILE,
                                 MANIFEST_FILE,
                                 METRICS_FILE,
                                 MODEL_FILE,
                                 MODEL_INDEX_FILE,
                                 QUANT_FILE,
                                 RANKS_DIR,
                                 REPORT_DIR,
                                 STATE_FILE,
                                 SUMMARY_FILE,
                                 SWEEP_FILE,
                                 SWEEP_PLAN_FILE,
                                 TOKENIZER_FILE,
                                 TRAIN_CONFIG_FILE,
                                 DamagedFileError,
                                 atomic_copy,
                                 atomic_write,
                                 atomic_write_json,
)
from moekit.rundir.run import RunDir, load_checkpoint, read_manifest, save_checkpoint
from moekit.rundir.shards import ShardReader
from moekit.rundir.weights import CheckpointError, load_weights, materialise, save_weights

__all__ = [
                                 "COMPARE_FILE",
                                 "CONFIG_FILE",
                                 "DATA_DIR",
                                 "DCP_DIR",
                                 "HF_CONFIG_FILE",
                                 "INIT_FILE",
                                 "MANIFEST_FILE",
                                 "METRICS_FILE",
                                 "MODEL_FILE",
                                 "MODEL_INDEX_FILE",
                                 "QUANT_FILE",
                                 "RANKS_DIR",
                                 "REPORT_DIR",
                                 "STATE_FILE",
                                 "SUMMARY_FILE",
                                 "SWEEP_FILE",
                                 "SWEEP_PLAN_FILE",
                                 "TOKENIZER_FILE",
                                 "TRAIN_CONFIG_FILE",
                                 "CheckpointError",
                                 "DamagedFileError",
                                 "RunDir",
                                 "ShardReader",
                                 "atomic_copy",
                                 "atomic_write",
                                 "atomic_write_json",
                                 "load_checkpoint",
                                 "load_weights",
                                 "materialise",
                                 "read_manifest",
                                 "save_checkpoint",
                                 "save_weights",
]
