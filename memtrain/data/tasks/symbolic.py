"""The long-context tasks over a small closed word vocabulary, for models small enough to train on a CPU.

The sentencepiece tasks (`niah.py`, `babi.py`) need a model that first learns English-ish text. These are the
same tasks with every word one token of a fixed vocabulary of `len(VOCAB)` words. The haystack is RULER's noise
("the grass is green . the sky is blue ...", repeated from a random phase; sentences go in at sentence starts) or,
with filler = "random", i.i.d. filler words (nothing in it can be predicted or compressed away):

- `niah_single`: "magic number for KEY is VALUE ." at a uniform random depth; the prompt ends
  "magic number for KEY ? answer", the answer is VALUE, one of `NUM_VALUES` value words.
- `qa1` / `qa2` / `qa3`: the bAbI world simulator of `babi.py` (same stories, same questions), its sentences
  scattered in order at random depths; the prompt ends "where is Mary ? answer", the answer is a room.

Every example is exactly `length` tokens: prompt, then one answer token (so greedy exact match is the argmax
at the last prompt position). Example i depends only on (task, seed, split, i, length, events).
`chance(task)` is the accuracy of guessing uniformly among the answers the question allows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memtrain.data.errors import DataError
from memtrain.data.tasks.babi import ACTORS, DROP, MOVE, OBJECTS, ROOMS, TAKE, make_story

SYMBOLIC_TASKS = ("niah_single", "qa1", "qa2", "qa3")
NUM_KEYS = 16
NUM_VALUES = 16
NUM_FILLER = 32

_SPECIAL = ["<pad>", "<bos>", ".", "?", "answer"]
_NIAH = ["magic", "number", "for", "is"] + [f"key{i}" for i in range(NUM_KEYS)] + [f"val{i}" for i in range(NUM_VALUES)]
_BABI = sorted({w for phrase in MOVE + TAKE + DROP for w in phrase.split()} | {"the", "where", "was", "before"})
_FILLER = [f"w{i}" for i in range(NUM_FILLER)]
NOISE = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ."
"""RULER's noise haystack, repeated (filler = "noise"); "random" filler draws i.i.d. words w0 .. w31 instead."""
_NOISE_WORDS = sorted(set(NOISE.split()) - set(_SPECIAL + _NIAH + _BABI))
VOCAB: list[str] = (_SPECIAL + _NIAH + ACTORS + ROOMS + OBJECTS + [w for w in _BABI if w not in _NIAH] + _NOISE_WORDS
                    + _FILLER)
"""Token id = index in this list; `<pad>` = 0, `<bos>` = 1."""
ID = {w: i for i, w in enumerate(VOCAB)}
assert len(ID) == len(VOCAB), "duplicate word in the symbolic vocabulary"
FILLER_IDS = np.array([ID[w] for w in _FILLER], dtype=np.int64)
NOISE_IDS = np.array([ID[w] for w in NOISE.split()], dtype=np.int64)
FILLERS = ("noise", "random")
VALUE_IDS = [ID[f"val{i}"] for i in range(NUM_VALUES)]
ROOM_IDS = [ID[r] for r in ROOMS]


@dataclass
class SymbolicExample:
    tokens: np.ndarray
    """int64 `[length]`: prompt followed by the one answer token."""
    answer: int
    """The answer token id (= tokens[-1])."""
    meta: dict[str, Any] = field(default_factory=dict)
    """`depths` (fractions of the haystack where the sentences start) and the question."""


def encode(text: str) -> list[int]:
    """Words separated by spaces, '.' and '?' split off -> token ids; DataError for a word outside VOCAB."""
    words = text.replace(".", " .").replace("?", " ?").split()
    bad = [w for w in words if w not in ID]
    if bad:
        raise DataError(f"words {bad} are not in the symbolic vocabulary")
    return [ID[w] for w in words]


def decode(ids) -> str:
    return " ".join(VOCAB[int(i)] for i in ids)


def chance(task: str) -> float:
    """Uniform guessing among the answers the question allows: 1/16 values; 1/6 rooms; qa3 1/5 (the answer is
    never the room the question names)."""
    return {"niah_single": 1 / NUM_VALUES, "qa1": 1 / len(ROOMS), "qa2": 1 / len(ROOMS),
            "qa3": 1 / (len(ROOMS) - 1)}[task]


def _haystack(rng: np.random.Generator, n: int, filler: str) -> tuple[np.ndarray, np.ndarray]:
    """(n filler tokens, the offsets where a sentence may go in): noise = the NOISE cycle from a random phase,
    sentences going in at sentence starts; random = i.i.d. filler words, sentences going in anywhere."""
    if filler == "noise":
        cycle = len(NOISE_IDS)
        phase = int(rng.integers(0, cycle))
        hay = np.tile(NOISE_IDS, (n + phase) // cycle + 1)[phase:phase + n]
        starts = np.concatenate([[0], np.flatnonzero(hay == ID["."]) + 1])
        return hay, starts
    if filler == "random":
        return FILLER_IDS[rng.integers(0, NUM_FILLER, size=n)], np.arange(n + 1)
    raise DataError(f"unknown filler {filler!r}; use {' or '.join(FILLERS)}")


def _assemble(rng: np.random.Generator, length: int, sentences: list[list[int]], question: list[int],
              answer: int, filler: str) -> tuple[np.ndarray, list[float]]:
    head, tail = [ID["<bos>"]], question + [ID["answer"]]
    budget = length - len(head) - len(tail) - 1 - sum(len(s) for s in sentences)
    if budget < 0:
        raise DataError(f"length {length} is too short for this task: the prompt alone needs "
                        f"{length - budget} tokens; use a longer length or fewer events")
    hay, starts = _haystack(rng, budget, filler)
    cuts = np.sort(starts[rng.integers(0, len(starts), size=len(sentences))])
    parts, prev = [np.asarray(head, dtype=np.int64)], 0
    for cut, sent in zip(cuts, sentences):
        parts += [hay[prev:cut], np.asarray(sent, dtype=np.int64)]
        prev = cut
    parts += [hay[prev:], np.asarray(tail + [answer], dtype=np.int64)]
    tokens = np.concatenate(parts)
    assert len(tokens) == length, (len(tokens), length)
    return tokens, [round(float(c) / max(budget, 1), 4) for c in cuts]


def symbolic_example(task: str, length: int, seed: int, split: str, index: int, events: int = 6,
                     filler: str = "noise") -> SymbolicExample:
    """Example `index` of `task` at `length` tokens; a pure function of its arguments."""
    if task not in SYMBOLIC_TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(SYMBOLIC_TASKS)}")
    key = f"symbolic/{task}/{seed}/{split}/{index}/{length}/{events}/{filler}"
    rng = random.Random(key)
    nrng = np.random.default_rng(rng.getrandbits(64))
    if task == "niah_single":
        k, v = rng.randrange(NUM_KEYS), rng.randrange(NUM_VALUES)
        needle = encode(f"magic number for key{k} is val{v} .")
        question = encode(f"magic number for key{k} ?")
        tokens, depths = _assemble(nrng, length, [needle], question, VALUE_IDS[v], filler)
        return SymbolicExample(tokens, VALUE_IDS[v], {"depths": depths, "question": f"key{k}"})
    story = make_story(task, rng, events)
    sentences = [encode(s) for s in story.sentences]
    answer = ID[story.answer]
    question = encode(story.question.replace("Where", "where"))
    tokens, depths = _assemble(nrng, length, sentences, question, answer, filler)
    return SymbolicExample(tokens, answer, {"depths": depths, "question": story.question, "support": story.support})


def symbolic_batch(task: str, length: int, seed: int, split: str, start: int, count: int,
                   events: int = 6, filler: str = "noise") -> tuple[np.ndarray, np.ndarray]:
    """Examples start .. start + count - 1 as (tokens int64 `[count, length]`, answers int64 `[count]`)."""
    exs = [symbolic_example(task, length, seed, split, start + i, events, filler) for i in range(count)]
    return np.stack([e.tokens for e in exs]), np.array([e.answer for e in exs], dtype=np.int64)
