"""Reading task shards back for evaluation, and exact-match scoring."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from memtrain.data.errors import DataError
from memtrain.data.manifest import load_manifest
from memtrain.data.shards import read_shard


@dataclass
class TaskExample:
    key: str
    tokens: np.ndarray
    """Prompt followed by the answer; `len(tokens)` is the task's length."""
    prompt_tokens: int
    answer: str
    meta: dict[str, Any]

    @property
    def prompt(self) -> np.ndarray:
        return self.tokens[: self.prompt_tokens]

    @property
    def answer_ids(self) -> np.ndarray:
        return self.tokens[self.prompt_tokens:]


def read_examples(path: str, split: str = "val") -> Iterator[TaskExample]:
    """The examples of a task dataset made by `python -m memtrain.data.tasks`, in order."""
    manifest = load_manifest(path)
    for shard in manifest.split(split):
        for s in read_shard(manifest.path(shard), shard.sha256, manifest.dtype):
            if "answer.txt" not in s.fields or "meta.json" not in s.fields:
                raise DataError(f"shard {manifest.path(shard)} sample {s.key} has no answer; "
                                f"{path} is not a task dataset (make one with `python -m memtrain.data.tasks`)")
            meta = json.loads(s.fields["meta.json"])
            yield TaskExample(s.key, s.tokens, int(meta["prompt_tokens"]), s.fields["answer.txt"].decode(), meta)


def normalize(text: str) -> str:
    """Lower case, surrounding whitespace and trailing punctuation removed, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?,;:").strip()


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction's first line equals the answer after `normalize`."""
    lines = prediction.strip().splitlines()
    return normalize(lines[0] if lines else "") == normalize(answer)
