"""Small deterministic corpora and datasets for tests (they take well under a second to prepare).

Test files import these instead of sharing a conftest, so every data test file stands alone.
"""
from __future__ import annotations

import gzip
import json
import os
import random

from memtrain.data import prepare

_WORDS = ("the cat sat on a mat while seven dogs ran across wide green fields under blue sky and "
          "def return import class for in if else print value index 0 1 2 3 4 5 6 7 8 9").split()


def write_corpus(root: str, n_docs: int = 48, seed: int = 0) -> list[str]:
    """Write `n_docs` documents of varied length across .txt, .md, .py, .jsonl and .jsonl.gz files."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)

    def doc() -> str:
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 40))]
        return "\n".join(lines) + "\n"

    paths, i = [], 0
    jsonl = []
    while i < n_docs:
        kind = i % 5
        if kind < 3:
            path = os.path.join(root, f"doc{i:03d}" + (".txt", ".md", ".py")[kind])
            with open(path, "w", encoding="utf-8") as f:
                f.write(doc())
            paths.append(path)
        else:
            jsonl.append(json.dumps({"text": doc(), "id": i}))
        i += 1
    half = len(jsonl) // 2
    with open(os.path.join(root, "part.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(jsonl[:half]) + "\n")
    with gzip.GzipFile(os.path.join(root, "part2.jsonl.gz"), "wb", mtime=0) as f:
        f.write(("\n".join(jsonl[half:]) + "\n").encode())
    return paths


def prepare_tiny(corpus: str, out: str, *, vocab_size: int = 320, shard_tokens: int = 1500, val_every: int = 8,
                 workers: int = 1, extra: list[str] | None = None) -> dict:
    """Prepare `corpus` (from `write_corpus`) into `out`; returns the manifest dict."""
    argv = ["--input", os.path.join(corpus, "*"), "--out", out, "--vocab-size", str(vocab_size),
            "--shard-tokens", str(shard_tokens), "--val-every", str(val_every), "--workers", str(workers),
            "--quiet"] + (extra or [])
    return prepare.prepare(prepare.parse_args(argv))


def tiny_dataset(base: str, name: str = "tiny", **kwargs) -> str:
    """A prepared tiny dataset under `base`, made once and reused (e.g. per pytest session)."""
    out = os.path.join(base, name)
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        corpus = os.path.join(base, name + "_corpus")
        write_corpus(corpus, n_docs=kwargs.pop("n_docs", 48))
        prepare_tiny(corpus, out, **kwargs)
    return out
