"""Filler text for the haystack, as token arrays cut at line ends so inserted sentences never split a word.

`noise` is RULER's repeated "The grass is green..." paragraph; `corpus` draws consecutive lines from random
documents of a prepared dataset's train split (already tokenized with the same tokenizer, so no re-encoding).
"""
from __future__ import annotations

import random

import numpy as np

from memtrain.data.errors import DataError
from memtrain.data.manifest import Manifest
from memtrain.data.shards import read_shard
from memtrain.data.tokenizer import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


class Filler:
    """`take(n, rng)`: n filler tokens; `newline` marks the line ends insertions snap to."""

    def __init__(self, kind: str, tok: Tokenizer, manifest: Manifest | None = None) -> None:
        self.kind = kind
        self.newline = tok.piece_to_id("\n")
        if kind == "noise":
            self._noise = np.asarray(tok.encode(NOISE), dtype=np.int64)
        elif kind == "corpus":
            if manifest is None:
                raise DataError("--filler corpus needs --data DIR, a prepared dataset to take the text from")
            docs = [s.tokens.astype(np.int64) for sh in manifest.split("train")
                    for s in read_shard(manifest.path(sh), sh.sha256, manifest.dtype)]
            self._docs = [d for d in docs if len(d) > 0]
            if not self._docs:
                raise DataError(f"{manifest.dir} has no train documents to use as filler")
        else:
            raise DataError(f"unknown filler {kind!r}; use noise or corpus")

    def take(self, n: int, rng: random.Random) -> np.ndarray:
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        if self.kind == "noise":
            reps = -(-n // len(self._noise))
            return np.tile(self._noise, reps)[:n]
        pieces, got = [], 0
        while got < n:
            doc = self._docs[rng.randrange(len(self._docs))]
            lines = np.flatnonzero(doc == self.newline)
            start = int(lines[rng.randrange(len(lines))]) + 1 if len(lines) else 0
            piece = doc[start:start + n - got]
            pieces.append(piece)
            got += len(piece)
        return np.concatenate(pieces)[:n]


def line_boundary(filler: np.ndarray, pos: int, newline: int) -> int:
    """The last line start at or before `pos`; the haystack's start counts (the intro ends with a newline)."""
    ends = np.flatnonzero(filler[:pos] == newline)
    return int(ends[-1]) + 1 if len(ends) else 0
