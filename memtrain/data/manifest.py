"""`DIR/manifest.json`: what a prepared dataset holds, and the checks done before any shard is read.

The manifest names the tokenizer file with its sha256 and vocabulary size, the token dtype, and every shard
with its split, document and token counts, size and sha256. It is written with sorted keys and no timestamp,
so the same inputs give a byte-identical manifest as well as byte-identical shards.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from memtrain.data.errors import DataError
from memtrain.data.tokenizer import Tokenizer, file_sha256

FORMAT = "memtrain-shards/1"
MANIFEST = "manifest.json"
PREPARE_HINT = "python -m memtrain.data.prepare --source stdlib --out {dir}"


@dataclass(frozen=True)
class ShardMeta:
    file: str
    split: str
    docs: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    dir: str
    raw: dict[str, Any]
    shards: list[ShardMeta]

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def dtype(self) -> str:
        return str(self.raw["dtype"])

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.dir, self.raw["tokenizer"]["file"])

    def split(self, name: str) -> list[ShardMeta]:
        """Shards of one split in manifest order; a clear error when the split is missing or empty."""
        shards = [s for s in self.shards if s.split == name]
        if not shards:
            have = sorted({s.split for s in self.shards})
            raise DataError(f"{os.path.join(self.dir, MANIFEST)} has no {name!r} split (it has {have}); "
                            f"re-run memtrain.data.prepare with --val-every N (N >= 2, default 100) to hold out a val split")
        return shards

    def path(self, shard: ShardMeta) -> str:
        return os.path.join(self.dir, shard.file)


def write_manifest(out_dir: str, raw: dict[str, Any]) -> str:
    path = os.path.join(out_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def build_manifest(tokenizer: Tokenizer, tokenizer_file: str, dtype: str, shards: list[ShardMeta],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """The manifest dict for `shards` (totals and per-split totals are derived here, once)."""
    def totals(items: list[ShardMeta]) -> dict[str, int]:
        return {"shards": len(items), "docs": sum(s.docs for s in items), "tokens": sum(s.tokens for s in items),
                "bytes": sum(s.bytes for s in items)}
    splits = sorted({s.split for s in shards})
    raw = {
        "format": FORMAT,
        "tokenizer": {"file": tokenizer_file, "sha256": tokenizer.sha256(), "vocab_size": tokenizer.vocab_size,
                      "unk_id": tokenizer.unk_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id},
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "shards": [vars(s) for s in shards],
        "splits": {name: totals([s for s in shards if s.split == name]) for name in splits},
        "totals": totals(shards),
    }
    raw.update(extra)
    return raw


def load_manifest(data_dir: str) -> Manifest:
    """Parse and sanity-check `data_dir/manifest.json`; every problem is a one-line `DataError`."""
    if not os.path.isdir(data_dir):
        raise DataError(f"dataset directory {data_dir} does not exist; create it with `{PREPARE_HINT.format(dir=data_dir)}`")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: {data_dir} is not a prepared dataset; "
                        f"run `{PREPARE_HINT.format(dir=data_dir)}`")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            raise DataError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}; re-run memtrain.data.prepare")
        shards = [ShardMeta(str(s["file"]), str(s["split"]), int(s["docs"]), int(s["tokens"]), int(s["bytes"]),
                            str(s["sha256"])) for s in raw["shards"]]
        int(raw["vocab_size"]), raw["tokenizer"]["file"], raw["tokenizer"]["sha256"]
        if raw["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{path}: dtype {raw['dtype']!r} is not uint16/uint32; re-run memtrain.data.prepare")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run memtrain.data.prepare")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is missing or has a malformed field ({exc!r}); re-run memtrain.data.prepare")
    return Manifest(os.path.abspath(data_dir), raw, shards)


def check_tokenizer(manifest: Manifest) -> Tokenizer:
    """Load the dataset's tokenizer and make sure it is the one the shards were made with."""
    tok = Tokenizer(manifest.tokenizer_path)
    want = manifest.raw["tokenizer"]
    if tok.vocab_size != manifest.vocab_size:
        raise DataError(f"tokenizer {tok.path} has vocab size {tok.vocab_size}, manifest says "
                        f"{manifest.vocab_size}; restore the original tokenizer or re-run memtrain.data.prepare")
    got = file_sha256(tok.path)
    if got != want["sha256"]:
        raise DataError(f"tokenizer {tok.path} has sha256 {got[:12]}…, manifest says {want['sha256'][:12]}…; "
                        f"restore the original tokenizer or re-run memtrain.data.prepare")
    return tok
