"""Hugging Face export and import of memtrain checkpoints (docs/export.md).

Two kinds of files live here:

* templates copied verbatim into every export and run by transformers with `trust_remote_code=True`:
  `configuration_memtrain.py`, `modeling_memtrain.py` (+ `memtrain_layers.py`, `memtrain_rmt.py`,
  `memtrain_titans.py`, imported relatively), `tokenization_memtrain.py` (plain torch + transformers +
  sentencepiece, never a project import);
* the converter used by `python -m memtrain.train.export_hf` / `python -m memtrain.train.import_hf`: `merge.py` (read and merge
  parallel checkpoint shards), `convert.py` (native <-> Hugging Face names, layouts and config), `files.py`
  (sharded safetensors, tokenizer files, generation config, model card).
"""
from __future__ import annotations

TEMPLATE_FILES = ("configuration_memtrain.py", "modeling_memtrain.py", "memtrain_layers.py", "memtrain_rmt.py",
                  "memtrain_titans.py", "tokenization_memtrain.py")


class ExportError(Exception):
    """Bad input to export/import (incomplete checkpoint, mismatched config, non-empty output, ...).

    The command-line tools print the message as one line on stderr and exit with code 2.
    """
