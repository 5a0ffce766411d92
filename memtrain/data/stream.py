"""`build_stream`: the trainer's endless, exactly resumable stream of packed batches.

    stream = build_stream(cfg.data, dp_rank=r, dp_size=d)      # split="val" for the held-out stream
    for batch in stream:                                      # batch.inputs / .targets / .doc_start [B, S]
        ...
    ckpt["data"] = stream.state_dict()                        # the same on every DP rank; JSON-serialisable
    stream.load_state_dict(ckpt["data"])                      # saved at any dp_size / num_workers / batch_size

The order of training windows is global (docs/data.md "Global order"): the job's one token stream is cut into
windows of `seq_len + 1` (`memtrain.data.reader`), and micro-batch m of the job is windows
`[m * G, (m + 1) * G)` with `G = batch_size * dp_size`; DP rank r takes rows `[r * B, (r + 1) * B)` of it. So
a run at (dp, B) and one at (1, dp * B), or at (1, B) with dp times the grad_accum, see the same windows at
every optimizer step, and the state is one global position: (windows consumed, cursor at that window).

With W = num_workers > 0, DataLoader worker k makes the rank's micro-batches `k, k + W, ...` (counted from the
state the workers started from): the order in which a DataLoader hands out an IterableDataset's workers'
batches. Every worker walks the whole token stream, skipping the windows that are not its own; each batch
travels with the global position after its micro-batch, so batches prefetched but not consumed are simply
produced again after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memtrain.data.config import DataConfig
from memtrain.data.errors import DataError
from memtrain.data.manifest import Manifest, check_tokenizer, load_manifest
from memtrain.data.reader import PackedReader, emit_warnings, initial_state

STATE_VERSION = 2


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
    """What each DataLoader worker runs: the rank's rows of every W-th micro-batch, forever."""

    def __init__(self, stream: "Stream", state: dict) -> None:
        self.kwargs = stream._reader_kwargs()
        self.manifest, self.split, self.state = stream._manifest, stream.split, state
        self.rows, self.rank, self.dp_size = stream.cfg.batch_size, stream.dp_rank, stream.dp_size
        self.seq_len, self.workers = stream.cfg.seq_len, stream.workers

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        group = self.rows * self.dp_size  # windows per micro-batch of the job
        before, after = self.rank * self.rows, group - (self.rank + 1) * self.rows
        reader = None
        try:
            reader = PackedReader(self.manifest, self.split, state=self.state, **self.kwargs)
            windows = int(self.state["windows"])
            reader.advance(worker * group * self.seq_len)  # the micro-batches of the workers before this one
            windows += worker * group
            index = worker
            while True:
                inputs, targets, doc_start = reader.windows(before, self.rows, after, self.seq_len)
                windows += group
                state = {"windows": windows, **reader.state()}
                warns, reader.warnings = reader.warnings, []
                yield (torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_start),
                       state, index, warns)
                reader.advance((self.workers - 1) * group * self.seq_len)
                windows += (self.workers - 1) * group
                index += self.workers
        except DataError as exc:
            # Handed over as a value: a raised exception would reach the trainer wrapped in a worker traceback.
            yield ("error", str(exc))
        finally:
            if reader is not None:
                reader.close()


class Stream:
    """See the module docstring. Iterating continues from the current state; it never ends."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, split: str = "train") -> None:
        _check_config(cfg, dp_rank, dp_size, split)
        self.cfg, self.dp_rank, self.dp_size, self.split = cfg, dp_rank, dp_size, split
        self._manifest: Manifest = load_manifest(cfg.path, cfg.retries, cfg.retry_delay)
        self._manifest.split(split)  # a missing split fails here, not in a worker
        tok = check_tokenizer(self._manifest)
        self.vocab_size: int = self._manifest.vocab_size
        self.eos_id: int = tok.eos_id
        self.bos_id: int = tok.bos_id
        self.pad_id: int = tok.pad_id
        self.workers = max(1, cfg.num_workers)
        self._state = {"windows": 0, **initial_state()}
        self._served = 0  # micro-batches handed out since the workers started from `_state`'s predecessor
        self._it: Iterator[tuple] | None = None
        # What a saved position is only valid for. Not dp_size, batch_size or num_workers: the order of
        # windows does not depend on them, so a state carries across data-parallel sizes.
        self._fingerprint = {"manifest_sha256": self._manifest.sha256, "split": split, "seq_len": cfg.seq_len,
                             "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer}

    def _reader_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {"seed": c.seed, "shuffle_buffer": c.shuffle_buffer, "shuffle": self.split == "train",
                "skip_bad": c.skip_bad_shards, "eos_id": self.eos_id}

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far in the job's stream (a shard skipped again after a resume counts again)."""
        return int(self._state["skipped"])

    @property
    def epoch(self) -> int:
        """The epoch of the next window to be read."""
        return int(self._state["epoch"])

    @property
    def windows(self) -> int:
        """Windows of `seq_len + 1` the whole job (all DP ranks) has consumed."""
        return int(self._state["windows"])

    def _open(self) -> Iterator[tuple]:
        self._served = 0
        dataset = _WorkerDataset(self, dict(self._state))
        if self.cfg.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=self.cfg.prefetch_batches, persistent_workers=False)
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
        inputs, targets, doc_start, state, index, warns = item
        if index != self._served:  # the round-robin order is what makes resume exact
            raise RuntimeError(f"data worker answered micro-batch {index} out of turn (expected {self._served})")
        emit_warnings(warns)
        self._state = state
        self._served += 1
        return Batch(inputs, targets, doc_start)

    def state_dict(self) -> dict:
        """Everything an exact resume needs: the job's position, identical on every DP rank; ints and strings
        only (JSON-serialisable)."""
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), **self._state}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data stream state has version {state.get('version') if isinstance(state, dict) else None!r}, "
                            f"expected {STATE_VERSION}; it was saved by another memtrain version")
        saved = state.get("fingerprint") or {}
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._fingerprint.items() if saved.get(k) != v]
        if diff:
            raise DataError(f"data stream state does not match this stream ({'; '.join(diff)}); resume with the same "
                            f"dataset ({self.cfg.path}) and data.seq_len / seed / shuffle_buffer")
        try:
            new = {k: int(state[k]) for k in ("windows", "epoch", "ordinal", "offset", "skipped")}
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"data stream state is missing or has a malformed position ({exc!r}); it is not a "
                            f"memtrain data state") from None
        self.close()
        self._state = new

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
    if cfg.retries < 0 or cfg.retry_delay < 0:
        problems.append(f"data.retries = {cfg.retries} and data.retry_delay = {cfg.retry_delay} must be >= 0")
    if cfg.prefetch_batches < 1:
        problems.append(f"data.prefetch_batches = {cfg.prefetch_batches} must be >= 1")
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
