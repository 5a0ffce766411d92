"""Write generated examples as shards + manifest, in the same format `memtrain.data.prepare` writes."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from memtrain.data.manifest import ShardMeta, build_manifest, write_manifest
from memtrain.data.shards import dtype_for_vocab, write_shard
from memtrain.data.tasks.assemble import Built
from memtrain.data.tokenizer import Tokenizer


def write_task_dataset(out: str, tok: Tokenizer, splits: dict[str, list[Built]], shard_tokens: int,
                       task_info: dict[str, Any]) -> dict:
    os.makedirs(out, exist_ok=True)
    tok_path = os.path.join(out, "tokenizer.model")
    if os.path.abspath(tok.path) != os.path.abspath(tok_path):
        shutil.copyfile(tok.path, tok_path)
    tok = Tokenizer(tok_path)
    dtype = dtype_for_vocab(tok.vocab_size)
    shards: list[ShardMeta] = []
    for split, examples in splits.items():
        batch: list[tuple[int, Built]] = []
        for i, ex in enumerate(examples):
            batch.append((i, ex))
            if sum(len(b.tokens) for _, b in batch) >= shard_tokens or i == len(examples) - 1:
                name = f"{split}-{sum(s.split == split for s in shards):06d}.tar"
                samples = []
                for j, b in batch:
                    meta = dict(b.meta, prompt_tokens=b.prompt_tokens, length=len(b.tokens), index=j)
                    fields = {"answer.txt": b.answer.encode(), "meta.json": json.dumps(meta, sort_keys=True).encode()}
                    samples.append((f"{split}-{j:07d}", b.tokens.astype(dtype), fields))
                digest, size = write_shard(os.path.join(out, name), samples)
                shards.append(ShardMeta(name, split, len(batch), sum(len(b.tokens) for _, b in batch), size, digest))
                batch = []
    raw = build_manifest(tok, "tokenizer.model", dtype, shards, {"task": task_info})
    write_manifest(out, raw)
    return raw
