"""RULER `niah_single`: one key–value "magic number" needle at a chosen depth, the question at the end.

Templates follow RULER: the prompt ends with "...mentioned in the provided text is" and the answer is the
7-digit number, so exact match needs no answer extraction.
"""
from __future__ import annotations

import random

from memtrain.data.tasks.assemble import Built, assemble
from memtrain.data.tasks.filler import Filler
from memtrain.data.tokenizer import Tokenizer

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
_ADJ = "amber brave calm dusty eager fancy gentle hollow icy jolly keen lucky misty noble olive plain quiet".split()
_NOUN = "anchor basket candle desert engine falcon garden harbor island jacket kettle lantern meadow".split()


def niah_single(tok: Tokenizer, filler: Filler, rng: random.Random, length: int,
                depth: float | None = None) -> Built:
    key = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    d = rng.random() if depth is None else depth
    built = assemble(tok, filler, rng, length=length, intro=INTRO, sentences=[NEEDLE.format(key=key, value=value)],
                     depths=[d], question=QUESTION.format(key=key), answer=value)
    built.meta.update({"key": key, "requested_depth": round(d, 4)})
    return built
