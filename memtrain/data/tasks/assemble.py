"""Build one example of exactly `length` tokens: intro + filler with sentences inserted + question + answer.

Each piece is tokenized on its own and the ids concatenated, so the total length is exact and the answer
starts at a known token (`prompt_tokens`). Sentences go in at the requested depths (fractions of the
haystack), moved back to the nearest line start so they never split a filler word, and keep their order.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memtrain.data.errors import DataError
from memtrain.data.tasks.filler import Filler, line_boundary
from memtrain.data.tokenizer import Tokenizer


@dataclass
class Built:
    tokens: np.ndarray
    prompt_tokens: int
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def assemble(tok: Tokenizer, filler: Filler, rng: random.Random, *, length: int, intro: str,
             sentences: list[str], depths: list[float], question: str, answer: str) -> Built:
    """`sentences[i]` goes at depth `depths[i]` (0 = start of the haystack, 1 = end); depths must be sorted."""
    head = tok.encode(intro)
    tail = tok.encode(question)
    ans = tok.encode(" " + answer)
    facts = [tok.encode(s + "\n") for s in sentences]
    budget = length - len(head) - len(tail) - len(ans) - sum(len(f) for f in facts)
    if budget < 0:
        raise DataError(f"--length {length} is too short for this task: the prompt alone needs "
                        f"{length - budget} tokens; use a larger --length")
    hay = filler.take(budget, rng)
    cuts = [line_boundary(hay, int(round(d * budget)), filler.newline) for d in depths]
    cuts = [max(cuts[:i + 1]) for i in range(len(cuts))]  # keep the story's order after snapping
    parts, positions, prev = [np.asarray(head, dtype=np.int64)], [], 0
    offset = len(head)
    for cut, fact in zip(cuts, facts):
        parts.append(hay[prev:cut])
        offset += cut - prev
        positions.append(offset)
        parts.append(np.asarray(fact, dtype=np.int64))
        offset += len(fact)
        prev = cut
    parts += [hay[prev:], np.asarray(tail, dtype=np.int64), np.asarray(ans, dtype=np.int64)]
    tokens = np.concatenate(parts)
    assert len(tokens) == length, (len(tokens), length)
    prompt = length - len(ans)
    return Built(tokens, prompt, answer, {"sentence_positions": positions,
                                          "depths": [round(c / max(budget, 1), 4) for c in cuts]})
