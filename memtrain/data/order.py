"""Which documents a reader sees, and in what order: pure functions of (seed, epoch, slot).

A *slot* is one reader of the whole job: data-parallel rank `r` with DataLoader worker `w` is slot
`r * workers + w` of `dp_size * workers`. Tensor and pipeline peers share a DP rank, so they are the same slot
and read the same tokens.

Each epoch the split's shards are cut into *units* (a whole shard, or when there are fewer shards than
slots, every `parts`-th document of a shard) and the units are permuted from (seed, epoch) and dealt to the
slots round-robin. A slot's documents for the epoch are its units' documents in order, shuffled within
consecutive blocks of `shuffle_buffer` documents, each block by its own (seed, epoch, slot, block) generator.
Because everything here is a pure function, a reader's position is just (epoch, ordinal, token offset): no
buffer contents ever need saving, and resuming jumps straight to the right block without replaying data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memtrain.data.manifest import ShardMeta

_SPLIT_CODE = {"train": 0, "val": 1}
# Documents fetched at a time when there is no shuffle buffer (amortises the per-block bookkeeping).
_READ_AHEAD = 256


@dataclass(frozen=True)
class Unit:
    shard: int
    """Index into the split's shard list."""
    part: int
    parts: int

    def docs(self, shard_docs: int) -> range:
        """Indices, within the shard, of this unit's documents."""
        return range(self.part, shard_docs, self.parts)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def slot_units(shards: list[ShardMeta], split: str, n_slots: int, slot: int, seed: int, epoch: int,
               shuffle: bool) -> list[Unit]:
    """The units slot `slot` reads in `epoch`, in reading order."""
    parts = max(1, -(-n_slots // len(shards)))
    units = [Unit(i, p, parts) for i in range(len(shards)) for p in range(parts)]
    if shuffle:
        order = _rng(seed, _SPLIT_CODE.get(split, 2), epoch).permutation(len(units))
        units = [units[i] for i in order]
    return units[slot::n_slots]


@dataclass
class EpochPlan:
    """A slot's documents for one epoch: `locate(ordinal)` gives (shard index, doc index in shard)."""

    units: list[Unit]
    counts: list[int]
    block: int
    """Documents per block: the shuffle buffer, or a fixed read-ahead when not shuffling."""
    permute: bool
    seed: int
    epoch: int
    slot: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    def block_range(self, b: int) -> range:
        return range(b * self.block, min((b + 1) * self.block, self.total))

    def block_sources(self, b: int) -> list[tuple[int, int]]:
        """(shard, doc) of every document of block `b`, in the block's shuffled output order."""
        span = self.block_range(b)
        src = [self._source(i) for i in span]
        if self.permute and len(src) > 1:
            perm = _rng(self.seed, self.epoch, self.slot, b, 7).permutation(len(src))
            src = [src[i] for i in perm]
        return src

    def _source(self, position: int) -> tuple[int, int]:
        for unit, count in zip(self.units, self.counts):
            if position < count:
                return unit.shard, unit.part + position * unit.parts
            position -= count
        raise IndexError(position)


def epoch_plan(shards: list[ShardMeta], split: str, n_slots: int, slot: int, seed: int, epoch: int,
               shuffle_buffer: int, shuffle: bool) -> EpochPlan:
    units = slot_units(shards, split, n_slots, slot, seed, epoch, shuffle)
    counts = [len(u.docs(shards[u.shard].docs)) for u in units]
    permute = shuffle and shuffle_buffer > 1
    return EpochPlan(units, counts, shuffle_buffer if permute else _READ_AHEAD, permute, seed, epoch, slot)
