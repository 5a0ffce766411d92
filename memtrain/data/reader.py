"""One slot's reader: documents in `memtrain.data.order`'s order, packed into batches of `seq_len + 1` windows.

The slot's token stream is every document followed by EOS, epoch after epoch, with no gaps. Batch j is
`B` consecutive windows of `seq_len + 1` tokens with stride `seq_len` (window k's last token is window
k+1's first input), so every token is a prediction target exactly once. The reader's whole state is the
position of the next batch's first token: (epoch, ordinal of the document in the epoch's order, offset into
that document + EOS). Loading that state rebuilds the block around it and continues bit for bit.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Iterator

import numpy as np

from memtrain.data.errors import DataError, DataWarning
from memtrain.data.manifest import Manifest, ShardMeta
from memtrain.data.order import EpochPlan, epoch_plan
from memtrain.data.shards import ShardError, read_shard

# Consecutive epochs without a single document before a slot gives up (the data is too small or all bad).
_MAX_EMPTY_EPOCHS = 4


def initial_state() -> dict:
    return {"epoch": 0, "ordinal": 0, "offset": 0, "skipped": 0}


class ShardCache:
    """The last few shards read, as lists of token arrays; a bad shard is `None` (skipped) or an error."""

    def __init__(self, manifest: Manifest, shards: list[ShardMeta], skip_bad: bool, capacity: int = 4) -> None:
        self.manifest, self.shards, self.skip_bad, self.capacity = manifest, shards, skip_bad, capacity
        self._cache: OrderedDict[int, list[np.ndarray] | None] = OrderedDict()
        self.skipped: list[str] = []
        """Messages of shards skipped since the caller last cleared this list."""

    def get(self, index: int) -> list[np.ndarray] | None:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        meta = self.shards[index]
        path = self.manifest.path(meta)
        try:
            samples = read_shard(path, meta.sha256, self.manifest.dtype, self.manifest.vocab_size)
            docs = [s.tokens for s in samples]
            n_tokens = sum(len(d) for d in docs)
            if len(docs) != meta.docs or n_tokens != meta.tokens:
                raise ShardError(f"shard {path} holds {len(docs)} docs / {n_tokens} tokens, manifest says "
                                 f"{meta.docs} / {meta.tokens}; re-run memtrain.data.prepare")
        except ShardError as exc:
            if not self.skip_bad:
                raise DataError(f"{exc} (or set data.skip_bad_shards = true to skip it)") from None
            self.skipped.append(f"skipping bad shard: {exc}")
            docs = None
        self._cache[index] = docs
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return docs


class SlotReader:
    """Batches of one slot, as numpy arrays: `inputs`/`targets` int64 [B, S], `doc_start` bool [B, S]."""

    def __init__(self, manifest: Manifest, split: str, slot: int, n_slots: int, *, seq_len: int, batch_size: int,
                 seed: int, shuffle_buffer: int, shuffle: bool, skip_bad: bool, eos_id: int,
                 state: dict | None = None) -> None:
        self.manifest, self.split, self.slot, self.n_slots = manifest, split, slot, n_slots
        self.shards = manifest.split(split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle_buffer, self.shuffle = shuffle_buffer, shuffle
        self.cache = ShardCache(manifest, self.shards, skip_bad)
        self._eos = np.array([eos_id], dtype=np.int64)
        st = state or initial_state()
        self.epoch, self.ordinal, self.offset = int(st["epoch"]), int(st["ordinal"]), int(st["offset"])
        self.skipped = int(st.get("skipped", 0))
        self._plan: EpochPlan | None = None
        self._block = -1
        self._docs: list[np.ndarray | None] = []
        self.warnings: list[str] = []

    def state(self) -> dict:
        return {"epoch": self.epoch, "ordinal": self.ordinal, "offset": self.offset, "skipped": self.skipped}

    def _describe(self) -> str:
        return (f"split {self.split!r} of {self.manifest.dir} ({len(self.shards)} shards, "
                f"{sum(s.docs for s in self.shards)} docs) gave reader {self.slot} of {self.n_slots} "
                f"(dp_size x num_workers) no documents for {_MAX_EMPTY_EPOCHS} epochs")

    def _current(self) -> np.ndarray:
        """The document under the cursor, moving past skipped documents and epoch ends."""
        crossed = 0  # epoch ends crossed in this call; past the first, each one was an epoch with no documents
        while True:
            if self._plan is None or self._plan.epoch != self.epoch:
                self._plan = epoch_plan(self.shards, self.split, self.n_slots, self.slot, self.seed, self.epoch,
                                        self.shuffle_buffer, self.shuffle)
                self._block = -1
            if self.ordinal >= self._plan.total:
                crossed += 1
                if crossed > _MAX_EMPTY_EPOCHS:
                    raise DataError(f"{self._describe()}; use fewer DP ranks/workers, more data, or fix bad shards")
                self.epoch, self.ordinal, self.offset = self.epoch + 1, 0, 0
                continue
            b = self.ordinal // self._plan.block
            if b != self._block:
                self._load_block(b)
            doc = self._docs[self.ordinal - b * self._plan.block]
            if doc is None:
                self.ordinal, self.offset = self.ordinal + 1, 0
                continue
            return doc

    def _load_block(self, b: int) -> None:
        sources = self._plan.block_sources(b)
        # Each shard once, in shard order: the block's shuffled order would thrash the small shard cache.
        loaded = {shard: self.cache.get(shard) for shard in sorted({shard for shard, _ in sources})}
        docs: list[np.ndarray | None] = []
        for shard, index in sources:
            shard_docs = loaded[shard]
            docs.append(None if shard_docs is None or len(shard_docs[index]) == 0 else shard_docs[index])
        for msg in self.cache.skipped:
            self.skipped += 1
            self.warnings.append(msg)
        self.cache.skipped.clear()
        self._docs, self._block = docs, b

    def _take(self, n: int, tokens: list[np.ndarray], starts: list[int]) -> None:
        got = 0
        while got < n:
            doc = self._current()
            if self.offset == 0:
                starts.append(got)
            k = min(len(doc) + 1 - self.offset, n - got)
            end = self.offset + k
            if end <= len(doc):
                tokens.append(doc[self.offset:end])
                self.offset = end
            else:  # this piece runs through the document's last token and its EOS
                tokens.append(doc[self.offset:])
                tokens.append(self._eos)
                self.ordinal, self.offset = self.ordinal + 1, 0
            got += k

    def _peek(self) -> np.ndarray:
        doc = self._current()
        return doc[self.offset:self.offset + 1] if self.offset < len(doc) else self._eos

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.batch_size * self.seq_len
        tokens: list[np.ndarray] = []
        starts: list[int] = []
        self._take(n, tokens, starts)
        tokens.append(self._peek())
        flat = np.concatenate(tokens).astype(np.int64)
        doc_start = np.zeros(n, dtype=bool)
        doc_start[starts] = True
        shape = (self.batch_size, self.seq_len)
        return flat[:-1].reshape(shape), flat[1:].reshape(shape), doc_start.reshape(shape)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()


def emit_warnings(messages: list[str]) -> None:
    for msg in messages:
        warnings.warn(msg, DataWarning, stacklevel=3)
