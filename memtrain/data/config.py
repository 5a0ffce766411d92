"""Configuration of the data path: which prepared dataset to read and how to batch it.

The trainer hands this sub-config (and nothing else) to `memtrain.data.stream.build_stream`.
Field docstrings are the documentation: `python -m memtrain.train --help-config` prints them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    path: str = "data_cache/stdlib"
    """Prepared dataset: a directory holding `manifest.json` and the shards (made by `python -m memtrain.data.prepare`),
    or a manifest URL such as `http://host/ds/manifest.json` (docs/data.md, Hosting shards)."""

    seq_len: int = 256
    """Training sequence length in tokens; documents are packed into windows of `seq_len + 1`."""

    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank (the job reads batch_size x dp_size windows per micro-batch)."""

    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""

    shuffle_buffer: int = 1024
    """Documents held in the shuffle buffer; 0 or 1 keeps shard order."""

    seed: int = 1234
    """Seed of the shard order and the shuffle; with the epoch it fixes every batch."""

    lanes: int = 1
    """Independent token streams the train split is read in, lane l over the shards with index = l mod lanes.
    Row j of the job's micro-batch (batch_size x dp rows) comes from lane j // (rows / lanes), so a DP rank
    downloads only its lanes' shards: a multiple of dp x max(1, num_workers) reads every shard once per epoch
    (1: every rank and worker streams the whole split). Must divide batch_size x dp; the order of windows
    depends on it (not on dp), so keep it for the whole run (docs/data.md "Lanes"). The val split has one lane."""

    skip_bad_shards: bool = False
    """Warn about and skip corrupt or mismatching shards instead of stopping."""

    retries: int = 3
    """Retries of a shard or manifest download that fails (delays retry_delay, 2x, 4x... seconds) before the
    shard counts as bad."""

    retry_delay: float = 1.0
    """Seconds before the first retry of a failed download; doubled for each further retry."""

    prefetch_batches: int = 2
    """Batches each DataLoader worker reads ahead (num_workers > 0): a slow source stalls training only once the
    buffered batches are used up, up to num_workers x prefetch_batches (at least num_workers x (prefetch_batches
    - 1) once every worker waits on the source: tests/unit/test_data_remote.py)."""
