"""The job's one token stream, read in `memtrain.data.order`'s order and cut into windows of `seq_len + 1`.

The stream is every document followed by EOS, epoch after epoch, with no gaps. Window k is tokens
`[k * seq_len, k * seq_len + seq_len + 1)` (window k's last token is window k+1's first input), so every token
is a prediction target exactly once. Every reader (each DP rank, each DataLoader worker) walks the same stream
and materialises only the windows it is asked for: `advance` moves past the others' tokens without building
arrays. A reader's whole state is the position of its cursor: (epoch, ordinal of the document in the epoch's
order, offset into that document + EOS); loading it re-reads one shuffle block and continues bit for bit.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np

from memtrain.data.errors import DataError, DataWarning
from memtrain.data.manifest import Manifest, ShardMeta
from memtrain.data.order import EpochPlan, epoch_plan
from memtrain.data.shards import Sample, ShardError, iter_shard

# Consecutive epochs without a single document before the reader gives up (all shards bad or empty).
_MAX_EMPTY_EPOCHS = 4


def initial_state() -> dict:
    return {"epoch": 0, "ordinal": 0, "offset": 0, "skipped": 0}


class DocSource:
    """Documents of an epoch in ordinal order, streamed from one open shard at a time.

    Reading continues from where the previous `read` stopped without reopening; anything else (a resume,
    a new epoch) opens the shard holding the first wanted document and skips to its sample. A bad shard's
    documents not yet read become `None` (skipped with a warning) or a `DataError`, see `_bad`.
    """

    def __init__(self, manifest: Manifest, shards: list[ShardMeta], skip_bad: bool) -> None:
        self.manifest, self.shards, self.skip_bad = manifest, shards, skip_bad
        self._it: Iterator[Sample] | None = None
        self._at: tuple[int, int, int] | None = None  # (epoch, position in the plan's order, next sample index)
        self.skipped: list[str] = []
        """Messages of shards skipped since the caller last cleared this list."""
        self._bad_shards: set[tuple[int, int]] = set()  # (epoch, shard): not reopened for the next block

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
        self._it, self._at = None, None

    def read(self, plan: EpochPlan, first: int, n: int) -> list[np.ndarray | None]:
        """Documents of ordinals `[first, first + n)` of `plan`'s epoch (None: skipped or empty)."""
        pos, index = plan.locate(first)
        if self._at != (plan.epoch, pos, index):
            self.close()
        out: list[np.ndarray | None] = []
        while len(out) < n:
            meta = self.shards[plan.order[pos]]
            if index >= meta.docs:  # also a shard with no documents
                self.close()
                pos, index = pos + 1, 0
                continue
            if (plan.epoch, plan.order[pos]) in self._bad_shards:
                k = min(meta.docs - index, n - len(out))
                out += [None] * k
                index += k
                continue
            if self._it is None:
                self._it = iter_shard(self.manifest.path(meta), sha256=meta.sha256, dtype=self.manifest.dtype,
                                      vocab_size=self.manifest.vocab_size, docs=meta.docs, tokens=meta.tokens,
                                      start=index, retries=self.manifest.retries,
                                      retry_delay=self.manifest.retry_delay)
            url = self.manifest.path(meta)
            try:
                sample = next(self._it, None)
                if sample is None:
                    raise ShardError(f"shard {url} ended after {index} docs, manifest says {meta.docs}; "
                                     f"re-run memtrain.data.prepare")
            except ShardError as exc:
                self._bad(exc, plan.epoch, plan.order[pos])
                continue  # its remaining documents become None above
            out.append(sample.tokens if len(sample.tokens) else None)
            index += 1
            if index == meta.docs:
                # The shard's checks (sha256, counts) run after its last byte: read it now, so a bad shard is
                # found at the same point of the stream whatever is read next. Its documents stay used.
                try:
                    if next(self._it, None) is not None:
                        raise ShardError(f"shard {url} holds more than the {meta.docs} docs the manifest says; "
                                         f"re-run memtrain.data.prepare")
                except ShardError as exc:
                    self._bad(exc, plan.epoch, plan.order[pos])
        self._at = (plan.epoch, pos, index)
        return out

    def _bad(self, exc: ShardError, epoch: int, shard: int) -> None:
        self.close()
        if not self.skip_bad:
            raise DataError(f"{exc} (or set data.skip_bad_shards = true to skip it)") from None
        self.skipped.append(f"skipping bad shard: {exc}")
        self._bad_shards = {k for k in self._bad_shards if k[0] == epoch} | {(epoch, shard)}


class PackedReader:
    """The cursor over the token stream; `take` gives tokens, `advance` moves past them (see module docstring)."""

    def __init__(self, manifest: Manifest, split: str, *, seed: int, shuffle_buffer: int, shuffle: bool,
                 skip_bad: bool, eos_id: int, state: dict | None = None, lane: int = 0, lanes: int = 1) -> None:
        self.manifest, self.split = manifest, split
        # one lane's token stream: its own shards (index = lane mod lanes) in its own order (docs/data.md "Lanes")
        self.shards = manifest.split(split)[lane::lanes]
        self._lane_key = (lanes, lane) if lanes > 1 else ()
        self.seed, self.shuffle_buffer, self.shuffle = seed, shuffle_buffer, shuffle
        self.source = DocSource(manifest, self.shards, skip_bad)
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

    def close(self) -> None:
        self.source.close()

    def _current(self) -> np.ndarray:
        """The document under the cursor, moving past skipped documents and epoch ends."""
        crossed = 0  # epoch ends crossed in this call; past the first, each one was an epoch with no documents
        while True:
            if self._plan is None or self._plan.epoch != self.epoch:
                self._plan = epoch_plan(self.shards, self.split, self.seed, self.epoch, self.shuffle_buffer,
                                        self.shuffle, self._lane_key)
                self._block = -1
            if self.ordinal >= self._plan.total:
                crossed += 1
                if crossed > _MAX_EMPTY_EPOCHS:
                    where = f"split {self.split!r} of {self.manifest.dir}"
                    fix = "fix or replace them"
                    if self._lane_key:
                        where = f"data lane {self._lane_key[1]} of {self._lane_key[0]} ({where})"
                        fix += " or lower data.lanes (a lane whose shards are all bad stops even with skip_bad_shards)"
                    raise DataError(f"{where} ({len(self.shards)} shards: {', '.join(s.file for s in self.shards[:3])}"
                                    f"{', ...' if len(self.shards) > 3 else ''}; {sum(s.docs for s in self.shards)} "
                                    f"docs) gave no documents for {_MAX_EMPTY_EPOCHS} epochs: every shard is bad or "
                                    f"empty; {fix}")
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
        span = self._plan.block_range(b)
        docs = self.source.read(self._plan, span.start, len(span))
        perm = self._plan.block_permutation(b)
        if perm is not None:
            docs = [docs[i] for i in perm]
        for msg in self.source.skipped:
            self.skipped += 1
            self.warnings.append(msg)
        self.source.skipped.clear()
        self._docs, self._block = docs, b

    def advance(self, n: int) -> None:
        """Move the cursor `n` tokens on (reading, but not copying, what it passes)."""
        while n > 0:
            doc = self._current()
            k = min(len(doc) + 1 - self.offset, n)
            self.offset += k
            n -= k
            if self.offset == len(doc) + 1:
                self.ordinal, self.offset = self.ordinal + 1, 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n + 1` tokens (int64) with the cursor moved `n` on, and bool [n] doc starts.

        The extra token is the last window's final target, which is the next window's first input.
        """
        pieces: list[np.ndarray] = []
        starts: list[int] = []
        got = 0
        while got < n:
            doc = self._current()
            if self.offset == 0:
                starts.append(got)
            k = min(len(doc) + 1 - self.offset, n - got)
            end = self.offset + k
            if end <= len(doc):
                pieces.append(doc[self.offset:end])
                self.offset = end
            else:  # this piece runs through the document's last token and its EOS
                pieces.append(doc[self.offset:])
                pieces.append(self._eos)
                self.ordinal, self.offset = self.ordinal + 1, 0
            got += k
        doc = self._current()
        pieces.append(doc[self.offset:self.offset + 1] if self.offset < len(doc) else self._eos)
        doc_start = np.zeros(n, dtype=bool)
        doc_start[starts] = True
        return np.concatenate(pieces).astype(np.int64), doc_start

    def windows(self, skip_before: int, rows: int, skip_after: int, seq_len: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Skip `skip_before` windows, return the next `rows` as (inputs, targets, doc_start) [rows, seq_len],
        then skip `skip_after` more."""
        self.advance(skip_before * seq_len)
        flat, doc_start = self.take(rows * seq_len)
        self.advance(skip_after * seq_len)
        # `advance` can stop just past a document (or an epoch) without stepping over what follows; `take` does
        # step over it. Settle here too, so every reader at one stream position reports the same cursor (DP
        # ranks sharing a lane compare theirs when their states are merged).
        self._current()
        shape = (rows, seq_len)
        return flat[:-1].reshape(shape), flat[1:].reshape(shape), doc_start.reshape(shape)


def emit_warnings(messages: list[str]) -> None:
    for msg in messages:
        warnings.warn(msg, DataWarning, stacklevel=3)
