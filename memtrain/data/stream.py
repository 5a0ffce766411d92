"""`build_stream`: the trainer's endless, exactly resumable stream of packed batches.

    stream = build_stream(cfg.data, dp_rank=r, dp_size=d)      # split="val" for the held-out stream
    for batch in stream:                                      # batch.inputs / .targets / .doc_start [B, S]
        ...
    state = merge_states(all_ranks_state_dicts)               # only with data.lanes > 1: see below
    stream.load_state_dict(state)                             # saved at any dp_size / num_workers / batch_size

The order of training windows is global (docs/data.md "Global order"). The split is read in K = `data.lanes`
lanes, each a token stream of its own shards cut into windows of `seq_len + 1` (`memtrain.data.reader`; K = 1
is the job's one stream). Micro-batch m of the job has `G = batch_size * dp_size` rows; rows
`[l * G/K, (l+1) * G/K)` are lane l's windows `[m * G/K, (m+1) * G/K)`, and DP rank r takes rows
`[r * B, (r+1) * B)`. So a run at (dp, B) and one at (1, dp * B), or at (1, B) with dp times the grad_accum,
see the same windows at every optimizer step, and the state is a global position: windows consumed and each
lane's cursor. A rank reads only the lanes its rows come from, so its `state_dict` knows only those lanes'
cursors (the others are None); `merge_states` of all ranks' dicts is the job's state, identical everywhere.

The rank's micro-batch is made of `pieces`: one per lane it reads, each the rank's rows of that lane. With
W = num_workers > 0, DataLoader worker k makes the items `n = m * L + i` (micro-batch m, piece i of L) with
`n = k (mod W)`: the order in which a DataLoader hands out an IterableDataset's workers' items, so the batches
are the same as with W = 0. When W divides L a worker reads only its own lanes; otherwise workers share a lane
and each walks past the windows of the micro-batches that are not its own. Every item travels with its lane's
position after its micro-batch, so items prefetched but not consumed are simply produced again after a resume.
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

STATE_VERSION = 3
_CURSOR = ("epoch", "ordinal", "offset", "skipped")


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


@dataclass(frozen=True)
class Piece:
    """The rows a rank takes from one lane in every micro-batch: skip `before` of the lane's windows, take
    `rows`, skip `after` (`before + rows + after` = the lane's G / K windows per micro-batch)."""
    lane: int
    before: int
    rows: int
    after: int


def rank_pieces(batch_size: int, dp_rank: int, dp_size: int, lanes: int) -> list[Piece]:
    """The pieces of DP rank `dp_rank`'s rows, in row order (lanes must divide batch_size * dp_size)."""
    per_lane = batch_size * dp_size // lanes
    lo, hi = dp_rank * batch_size, (dp_rank + 1) * batch_size
    pieces = []
    for lane in range(lo // per_lane, (hi - 1) // per_lane + 1):
        first, end = max(lo, lane * per_lane), min(hi, (lane + 1) * per_lane)
        pieces.append(Piece(lane, first - lane * per_lane, end - first, (lane + 1) * per_lane - end))
    return pieces


def merge_states(states: list[dict]) -> dict:
    """The job's data state from every rank's `state_dict()` (any order, any number of copies per DP rank):
    each lane's cursor is taken from the ranks that read it."""
    if not states or any(not isinstance(s, dict) or s.get("version") != STATE_VERSION for s in states):
        raise DataError(f"merge_states takes one or more data stream states of version {STATE_VERSION} (from "
                        f"Stream.state_dict of this memtrain version)")
    first = states[0]
    for key in ("fingerprint", "windows"):
        if any(s.get(key) != first.get(key) for s in states):
            raise DataError(f"data stream states to merge differ in {key} ({first.get(key)!r} vs others): merge the "
                            f"states of one job, saved at the same step")
    if any(len(s["lanes"]) != len(first["lanes"]) for s in states):
        raise DataError("data stream states to merge have different numbers of lanes: merge the states of one job")
    lanes = []
    for lane in range(len(first["lanes"])):
        known = [s["lanes"][lane] for s in states if s["lanes"][lane] is not None]
        if not known:
            raise DataError(f"no rank reported the position of data lane {lane}: pass every DP rank's state")
        if any(k != known[0] for k in known):  # readers settle their cursors (PackedReader.windows): a bug
            raise RuntimeError(f"ranks disagree on the position of data lane {lane}: {known} (a memtrain bug)")
        lanes.append(known[0])
    return {**first, "lanes": lanes}


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker runs: its items of the rank's pieces (module docstring), forever."""

    def __init__(self, stream: "Stream", state: dict) -> None:
        self.kwargs = stream._reader_kwargs()
        self.manifest, self.split, self.lanes = stream._manifest, stream.split, stream.lanes
        self.pieces, self.state = stream.pieces, state
        self.per_lane = stream.cfg.batch_size * stream.dp_size // stream.lanes
        self.seq_len, self.workers = stream.cfg.seq_len, stream.workers

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        n = info.id if info is not None else 0
        readers: dict[int, PackedReader] = {}
        at: dict[int, int] = {}  # piece -> the micro-batch its reader stands at
        try:
            while True:
                m, i = divmod(n, len(self.pieces))
                piece = self.pieces[i]
                reader = readers.get(i)
                if reader is None:
                    reader = readers[i] = PackedReader(self.manifest, self.split, state=self.state["lanes"][piece.lane],
                                                       lane=piece.lane, lanes=self.lanes, **self.kwargs)
                    at[i] = 0
                reader.advance((m - at[i]) * self.per_lane * self.seq_len)  # other workers' micro-batches
                inputs, targets, doc_start = reader.windows(piece.before, piece.rows, piece.after, self.seq_len)
                at[i] = m + 1
                warns, reader.warnings = reader.warnings, []
                yield (torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_start),
                       reader.state(), n, warns)
                n += self.workers
        except DataError as exc:
            # Handed over as a value: a raised exception would reach the trainer wrapped in a worker traceback.
            yield ("error", str(exc))
        finally:
            for reader in readers.values():
                reader.close()


class Stream:
    """See the module docstring. Iterating continues from the current state; it never ends."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, split: str = "train") -> None:
        _check_config(cfg, dp_rank, dp_size, split)
        self.cfg, self.dp_rank, self.dp_size, self.split = cfg, dp_rank, dp_size, split
        self.lanes: int = cfg.lanes if split == "train" else 1  # the val split is small: read whole by every rank
        self._manifest: Manifest = load_manifest(cfg.path, cfg.retries, cfg.retry_delay)
        shards = len(self._manifest.split(split))  # a missing split fails here, not in a worker
        if self.lanes > shards:
            raise DataError(f"data.lanes = {self.lanes} but split {split!r} of {cfg.path} has {shards} shards: every "
                            f"lane needs one; set data.lanes <= {shards} or prepare smaller shards")
        tok = check_tokenizer(self._manifest)
        self.vocab_size: int = self._manifest.vocab_size
        self.eos_id: int = tok.eos_id
        self.bos_id: int = tok.bos_id
        self.pad_id: int = tok.pad_id
        self.workers = max(1, cfg.num_workers)
        self.pieces = rank_pieces(cfg.batch_size, dp_rank, dp_size, self.lanes)
        self._state: dict = {"windows": 0, "lanes": [initial_state() for _ in range(self.lanes)]}
        self._served = 0  # items handed out since the workers started from `_state`'s predecessor
        self._it: Iterator[tuple] | None = None
        # What a saved position is only valid for. Not dp_size, batch_size or num_workers: the order of
        # windows does not depend on them, so a state carries across data-parallel sizes.
        self._fingerprint = {"manifest_sha256": self._manifest.sha256, "split": split, "seq_len": cfg.seq_len,
                             "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer, "lanes": self.lanes}

    def _reader_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {"seed": c.seed, "shuffle_buffer": c.shuffle_buffer, "shuffle": self.split == "train",
                "skip_bad": c.skip_bad_shards, "eos_id": self.eos_id}

    def _own(self) -> list[dict]:
        return [self._state["lanes"][p.lane] for p in self.pieces]

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far in the lanes this rank reads (a shard skipped again after a resume counts
        again)."""
        return sum(int(c["skipped"]) for c in self._own())

    @property
    def epoch(self) -> int:
        """The epoch of the next window to be read (the earliest over the lanes this rank reads)."""
        return min(int(c["epoch"]) for c in self._own())

    @property
    def windows(self) -> int:
        """Windows of `seq_len + 1` the whole job (all DP ranks) has consumed."""
        return int(self._state["windows"])

    def _open(self) -> Iterator[tuple]:
        self._served = 0
        dataset = _WorkerDataset(self, {"lanes": list(self._state["lanes"])})
        if self.cfg.num_workers == 0:
            return iter(dataset)
        # a DataLoader item is one piece (one lane's rows): L of them make a batch
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=self.cfg.prefetch_batches * len(self.pieces), persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._open()
        parts, cursors = [], []
        for _ in self.pieces:
            item = next(self._it)
            if isinstance(item[0], str):  # ("error", message) from a worker
                self.close()
                raise DataError(item[1])
            inputs, targets, doc_start, cursor, index, warns = item
            if index != self._served:  # the round-robin order is what makes resume exact
                raise RuntimeError(f"data worker answered item {index} out of turn (expected {self._served})")
            emit_warnings(warns)
            parts.append((inputs, targets, doc_start))
            cursors.append(cursor)
            self._served += 1
        lanes = list(self._state["lanes"])
        for piece, cursor in zip(self.pieces, cursors):
            lanes[piece.lane] = cursor
        self._state = {"windows": self._state["windows"] + self.cfg.batch_size * self.dp_size, "lanes": lanes}
        if len(parts) == 1:
            return Batch(*parts[0])
        return Batch(*(torch.cat(t) for t in zip(*parts)))

    def state_dict(self) -> dict:
        """The job's position as this rank knows it: windows consumed and the cursor of every lane it reads
        (None for the others: `merge_states` over all ranks completes it; with one lane it is complete and the
        same on every rank). Ints and strings only (JSON-serialisable)."""
        own = {p.lane for p in self.pieces}
        lanes = [dict(c) if k in own else None for k, c in enumerate(self._state["lanes"])]
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), "windows": self.windows,
                "lanes": lanes}

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if version == 2:  # one lane, the cursor at the top level (memtrain before data.lanes)
            state = {**state, "fingerprint": {**(state.get("fingerprint") or {}), "lanes": 1},
                     "lanes": [{k: state.get(k) for k in _CURSOR}]}
        elif version != STATE_VERSION:
            raise DataError(f"data stream state has version {version!r}, expected {STATE_VERSION}; it was saved by "
                            f"another memtrain version")
        saved = state.get("fingerprint") or {}
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._fingerprint.items() if saved.get(k) != v]
        if diff:
            raise DataError(f"data stream state does not match this stream ({'; '.join(diff)}); resume with the same "
                            f"dataset ({self.cfg.path}) and data.seq_len / seed / shuffle_buffer / lanes")
        try:
            lanes = [None if c is None else {k: int(c[k]) for k in _CURSOR} for c in state["lanes"]]
            windows = int(state["windows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"data stream state is missing or has a malformed position ({exc!r}); it is not a "
                            f"memtrain data state") from None
        missing = sorted({p.lane for p in self.pieces if len(lanes) == self.lanes and lanes[p.lane] is None})
        if len(lanes) != self.lanes or missing:
            raise DataError(f"data stream state lacks the position of lanes {missing or list(range(self.lanes))}: "
                            f"it is one rank's part; save the merge of every rank's state (merge_states)")
        self.close()
        self._state = {"windows": windows, "lanes": [c or initial_state() for c in lanes]}

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
    if cfg.lanes < 1 or (split == "train" and (cfg.batch_size * dp_size) % cfg.lanes):
        problems.append(f"data.lanes = {cfg.lanes} must be >= 1 and divide the job's rows per micro-batch, "
                        f"data.batch_size x dp = {cfg.batch_size * dp_size}")
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
