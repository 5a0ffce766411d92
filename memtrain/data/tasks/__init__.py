"""Seeded, offline long-context tasks written as ordinary shards (plus an answer) at any length in tokens.

- `niah_single`: RULER-style single needle in a haystack ("One of the special magic numbers for KEY is:
  VALUE.") at a chosen depth of filler text, the question at the end.
- `qa1`, `qa2`, `qa3`: bAbI-style fact chains from a small world simulator (actors moving between rooms,
  picking up and dropping objects) with one, two or three supporting facts, the story scattered in order
  through filler text taken from the corpus.

`symbolic.py` holds the same four tasks over a closed 118-word vocabulary (one word = one token, generated in
memory, no tokenizer or corpus needed) for models small enough to train on a CPU: the long-context experiment
(`python -m memtrain.train.experiment long_context`) trains and evaluates on them.

Every sample's tokens are prompt + answer and exactly `length` long; `answer.txt` holds the answer and
`meta.json` where it starts (`prompt_tokens`), so the trainer reads task shards like any other data and the
evaluator feeds the prompt and scores the generation by exact match (`memtrain.data.tasks.examples`).
CLI: `python -m memtrain.data.tasks --task qa2 --data data_cache/stdlib --length 4096 --num 100 --out DIR`.
"""
from memtrain.data.tasks.examples import TaskExample, exact_match, read_examples

TASKS = ("niah_single", "qa1", "qa2", "qa3")

__all__ = ["TASKS", "TaskExample", "exact_match", "read_examples"]
