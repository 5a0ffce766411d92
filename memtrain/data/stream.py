"""`build_stream`: the trainer's endless, exactly resumable stream of packed batches.

    stream = build_stream(cfg.data, dp_rank=r, dp_size=d)      # split="val" for the held-out stream
    for batch in stream:                                      # batch.inputs / .targets / .doc_start [B, S]
        ...
    ckpt["data"] = stream.state_dict()                        # per DP rank; a small dict of ints
    stream.load_state_dict(ckpt["data"])

Each of the rank's `max(1, num_workers)` logical workers is a `SlotReader` whose state is three counters, and
batch n of the rank comes from logical worker `n % workers` — the order in which a DataLoader hands out the
batches of an IterableDataset's workers. Every batch travels with its worker's state after that batch, so the
stream's state is (batches consumed, each worker's state at its last consumed batch): batches prefetched but
not consumed are simply produced again after a resume. On resume DataLoader worker k plays logical worker
`(k + consumed) % workers`, so the round-robin continues where it stopped.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError
from memtrain.data.manifest import MANIFEST, Manifest, check_tokenizer, load_manifest
from memtrain.data.reader import SlotReader, emit_warnings, initial_state

STATE_VERSION = 1


@dataclass
class Batch:
    inputs: torch.Tensor
    """int64 [B, seq_len] token ids."""
    targets: torch.Tensor
    """int64 [B, seq_len]: `inputs` shifted left by one (the next token at every position)."""
    doc_start: torch.Tensor
    """bool [B, seq_len]: True where a new document starts at that input position (memory may be reset)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.inputs, self.targets, self.doc_start)))


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker runs: one logical worker's `SlotReader`, forever."""

    def __init__(self, stream: "Stream", states: list[dict], rotation: int) -> None:
        self.kwargs = stream._reader_kwargs()
        self.manifest, self.split, self.dp_rank, self.dp_size = stream._manifest, stream.split, stream.dp_rank, stream.dp_size
        self.workers, self.states, self.rotation = stream.workers, states, rotation

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        logical = ((info.id if info is not None else 0) + self.rotation) % self.workers
        try:
            reader = SlotReader(self.manifest, self.split, self.dp_rank * self.workers + logical,
                                self.dp_size * self.workers, state=self.states[logical], **self.kwargs)
            while True:
                inputs, targets, doc_start = reader.next_batch()
                warns, reader.warnings = reader.warnings, []
                yield (torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_start),
                       reader.state(), logical, warns)
        except DataError as exc:
            # Handed over as a value: a raised exception would reach the trainer wrapped in a worker traceback.
            yield ("error", str(exc))


class Stream:
    """See the module docstring. Iterating continues from the current state; it never ends."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, split: str = "train") -> None:
        _check_config(cfg, dp_rank, dp_size, split)
        self.cfg, self.dp_rank, self.dp_size, self.split = cfg, dp_rank, dp_size, split
        self._manifest: Manifest = load_manifest(cfg.path)
        self._manifest.split(split)  # a missing split fails here, not in a worker
        tok = check_tokenizer(self._manifest)
        self.vocab_size: int = self._manifest.vocab_size
        self.eos_id: int = tok.eos_id
        self.bos_id: int = tok.bos_id
        self.pad_id: int = tok.pad_id
        self.workers = max(1, cfg.num_workers)
        self._consumed = 0
        self._states = [initial_state() for _ in range(self.workers)]
        self._it: Iterator[tuple] | None = None
        with open(os.path.join(self._manifest.dir, MANIFEST), "rb") as f:
            manifest_sha = hashlib.sha256(f.read()).hexdigest()
        self._fingerprint = {"manifest_sha256": manifest_sha, "split": split, "dp_rank": dp_rank, "dp_size": dp_size,
                             "num_workers": cfg.num_workers, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                             "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer}

    def _reader_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {"seq_len": c.seq_len, "batch_size": c.batch_size, "seed": c.seed, "shuffle_buffer": c.shuffle_buffer,
                "shuffle": self.split == "train", "skip_bad": c.skip_bad_shards, "eos_id": self.eos_id}

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far (each skip of a shard in an epoch counts once per reader)."""
        return sum(int(s["skipped"]) for s in self._states)

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's workers is still reading."""
        return min(int(s["epoch"]) for s in self._states)

    def _open(self) -> Iterator[tuple]:
        dataset = _WorkerDataset(self, [dict(s) for s in self._states], self._consumed % self.workers)
        if self.cfg.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, prefetch_factor=2)
        return iter(loader)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._open()
        item = next(self._it)
        if isinstance(item[0], str):  # ("error", message) from a worker
            self.close()
            raise DataError(item[1])
        inputs, targets, doc_start, state, logical, warns = item
        if logical != self._consumed % self.workers:  # the round-robin order is what makes resume exact
            raise RuntimeError(f"data worker {logical} answered out of turn (expected {self._consumed % self.workers})")
        emit_warnings(warns)
        self._states[logical] = state
        self._consumed += 1
        return Batch(inputs, targets, doc_start)

    def state_dict(self) -> dict:
        """Everything an exact resume needs: picklable, a few ints per worker."""
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), "consumed": self._consumed,
                "workers": [dict(s) for s in self._states]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state has version {state.get('version') if isinstance(state, dict) else None!r}, "
                            f"expected {STATE_VERSION}; it was saved by another memtrain version")
        saved = state["fingerprint"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._fingerprint.items() if saved.get(k) != v]
        if diff:
            raise DataError(f"data stream state does not match this stream ({'; '.join(diff)}); resume with the same "
                            f"dataset ({self.cfg.path}) and data settings, and give each DP rank its own state")
        if len(state["workers"]) != self.workers:
            raise DataError(f"data stream state has {len(state['workers'])} workers, expected {self.workers}")
        self.close()
        self._consumed = int(state["consumed"])
        self._states = [dict(s) for s in state["workers"]]

    def close(self) -> None:
        """Stop the DataLoader workers (the next `next()` starts them again from the current state)."""
        self._it = None

    def __del__(self) -> None:
        self._it = None


def _check_config(cfg: DataConfig, dp_rank: int, dp_size: int, split: str) -> None:
    problems = []
    if cfg.seq_len < 1:
        problems.append(f"data.seq_len = {cfg.seq_len} must be >= 1")
    if cfg.batch_size < 1:
        problems.append(f"data.batch_size = {cfg.batch_size} must be >= 1")
    if cfg.num_workers < 0:
        problems.append(f"data.num_workers = {cfg.num_workers} must be >= 0")
    if cfg.shuffle_buffer < 0:
        problems.append(f"data.shuffle_buffer = {cfg.shuffle_buffer} must be >= 0")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        problems.append(f"dp_rank {dp_rank} / dp_size {dp_size} is not a valid data-parallel rank")
    if split not in ("train", "val"):
        problems.append(f"split {split!r} must be 'train' or 'val'")
    if problems:
        raise DataError("; ".join(problems))


def build_stream(cfg: DataConfig, *, dp_rank: int = 0, dp_size: int = 1, split: str = "train") -> Stream:
    """The rank's stream of `Batch`es over `cfg.path` (see the module docstring)."""
    return Stream(cfg, dp_rank, dp_size, split)
