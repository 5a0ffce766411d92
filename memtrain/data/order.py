"""Which documents the stream reads, and in what order: pure functions of (seed, split, epoch).

There is one order for the whole job, whatever the number of data-parallel ranks or DataLoader workers
(docs/data.md "Global order"). Each epoch the split's shards are permuted from (seed, split, epoch); the epoch's
documents are the shards' samples in that order, numbered by their *ordinal*. They are shuffled within
consecutive blocks of `shuffle_buffer` ordinals, each block by its own (seed, split, epoch, block) generator.
The manifest gives every shard's document count, so an ordinal maps to (shard, sample index) without reading
anything: a reader's position is just (epoch, ordinal, token offset), no buffer contents ever need saving, and
resuming opens the one shard holding the block's first document and skips to that sample.

With `data.lanes = K > 1` the train split is K such orders, one per lane over the shards whose index is
congruent to the lane mod K, each drawn from generators that also take (K, lane) (docs/data.md "Lanes").
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from memtrain.data.manifest import ShardMeta

_SPLIT_CODE = {"train": 0, "val": 1}
# Documents fetched at a time when there is no shuffle buffer (amortises the per-block bookkeeping).
_READ_AHEAD = 256


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


@dataclass
class EpochPlan:
    """The epoch's documents: `locate(ordinal)` gives (position in `order`, sample index in that shard)."""

    order: list[int]
    """Indices into the split's shard list, in reading order."""
    starts: list[int]
    """Ordinal of the first document of each position of `order`, then the epoch's total (len(order) + 1)."""
    block: int
    """Documents per block: the shuffle buffer, or a fixed read-ahead when not shuffling."""
    permute: bool
    seed: int
    split: int
    epoch: int
    lane_key: tuple[int, ...] = ()
    """(lanes, lane) when the split is read in several lanes, () for one: part of every generator's seed."""

    @property
    def total(self) -> int:
        return self.starts[-1]

    def locate(self, ordinal: int) -> tuple[int, int]:
        pos = bisect.bisect_right(self.starts, ordinal) - 1
        return pos, ordinal - self.starts[pos]

    def block_range(self, b: int) -> range:
        return range(b * self.block, min((b + 1) * self.block, self.total))

    def block_permutation(self, b: int) -> np.ndarray | None:
        """Output slot i of block `b` holds the block's document `perm[i]`; None keeps the order."""
        n = len(self.block_range(b))
        if not self.permute or n < 2:
            return None
        return _rng(self.seed, self.split, self.epoch, b, 7, *self.lane_key).permutation(n)


def epoch_plan(shards: list[ShardMeta], split: str, seed: int, epoch: int, shuffle_buffer: int,
               shuffle: bool, lane_key: tuple[int, ...] = ()) -> EpochPlan:
    """The plan of one epoch over `shards` (the split's, or one lane's: then `lane_key` = (lanes, lane))."""
    code = _SPLIT_CODE.get(split, 2)
    order = list(range(len(shards)))
    if shuffle:
        order = [int(i) for i in _rng(seed, code, epoch, *lane_key).permutation(len(shards))]
    starts = [0]
    for i in order:
        starts.append(starts[-1] + shards[i].docs)
    permute = shuffle and shuffle_buffer > 1
    return EpochPlan(order, starts, shuffle_buffer if permute else _READ_AHEAD, permute, seed, code, epoch, lane_key)
