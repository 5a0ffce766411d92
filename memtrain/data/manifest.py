"""`DIR/manifest.json`: what a prepared dataset holds, and the checks done before any shard is read.

The manifest names the tokenizer file with its sha256 and vocabulary size, the token dtype, and every shard
with its split, document and token counts, size and sha256 (of the whole file). It is written with sorted keys
and no timestamp, so the same inputs give a byte-identical manifest as well as byte-identical shards.

`data.path` is a local dataset directory, a local `.json` manifest, or a manifest URL
(`http://host/ds/manifest.json`, or `http://host/ds/` meaning its `manifest.json`). A shard's `file` is a path
relative to the manifest's location, an absolute URL, or a `pipe:COMMAND`; a brace pattern such as
`train-{000000..000009}.tar` stands for several shards, with `docs`, `tokens`, `bytes` and `sha256` then given
as lists with one value per expanded name (docs/data.md "Hosting shards").
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from webdataset.shardlists import expand_urls

from memtrain.data import remote
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
    """Where the dataset lives: an absolute local directory, or a URL ending in `/`."""
    raw: dict[str, Any]
    shards: list[ShardMeta]
    sha256: str = ""
    """sha256 of the manifest file's bytes (the stream's resume fingerprint)."""
    retries: int = 3
    retry_delay: float = 1.0
    _tokenizer_local: str | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def dtype(self) -> str:
        return str(self.raw["dtype"])

    @property
    def is_remote(self) -> bool:
        return remote.is_url(self.dir)

    @property
    def tokenizer_path(self) -> str:
        """A local file of the tokenizer (sentencepiece needs one): downloaded once into `remote.cache_dir()`,
        named by its sha256, when the dataset is remote."""
        name = self.raw["tokenizer"]["file"]
        if not self.is_remote and not remote.is_url(name):
            return os.path.join(self.dir, name)
        if self._tokenizer_local is None:
            want = "".join(c for c in str(self.raw["tokenizer"]["sha256"]) if c in "0123456789abcdef")
            local = os.path.join(remote.cache_dir(), f"tokenizer-{want}.model")
            if not os.path.isfile(local):
                data = remote.fetch_bytes(remote.join(self.dir, name), self.retries, self.retry_delay)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                tmp = f"{local}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, local)  # atomic: ranks downloading at once never see half a file
            self._tokenizer_local = local
        return self._tokenizer_local

    def split(self, name: str) -> list[ShardMeta]:
        """Shards of one split in manifest order; a clear error when the split is missing or empty."""
        shards = [s for s in self.shards if s.split == name]
        if not shards:
            have = sorted({s.split for s in self.shards})
            raise DataError(f"{remote.join(self.dir, MANIFEST)} has no {name!r} split (it has {have}); "
                            f"re-run memtrain.data.prepare with --val-every N (N >= 2, default 100) to hold out a val split")
        return shards

    def path(self, shard: ShardMeta) -> str:
        """The shard's location: a local path, a URL or a `pipe:` command (anything `remote.open_url` opens)."""
        return remote.join(self.dir, shard.file)


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


def _expand(entry: dict[str, Any]) -> list[ShardMeta]:
    """One manifest shard entry as ShardMetas: a brace pattern becomes one per expanded name."""
    files = expand_urls(str(entry["file"])) if "{" in str(entry["file"]) else [str(entry["file"])]
    per = {}
    for key in ("docs", "tokens", "bytes", "sha256"):
        value = entry[key]
        if isinstance(value, list):
            if len(value) != len(files):
                raise DataError(f"shard entry {entry['file']!r} expands to {len(files)} files but its {key!r} list has "
                                f"{len(value)} values; give one value per expanded file")
            per[key] = value
        elif len(files) > 1:
            raise DataError(f"shard entry {entry['file']!r} expands to {len(files)} files: its {key!r} must be a list "
                            f"with one value per file")
        else:
            per[key] = [value]
    return [ShardMeta(f, str(entry["split"]), int(per["docs"][i]), int(per["tokens"][i]), int(per["bytes"][i]),
                      str(per["sha256"][i])) for i, f in enumerate(files)]


def _read_manifest(data_path: str, retries: int, retry_delay: float) -> tuple[str, str, bytes]:
    """(base location, manifest location, manifest bytes) of `data_path`, a directory, a .json file or a URL."""
    if remote.is_url(data_path):
        where = data_path if data_path.endswith(".json") else remote.join(data_path, MANIFEST)
        try:
            data = remote.fetch_bytes(where, retries, retry_delay)
        except DataError as exc:
            raise DataError(f"manifest {exc}; check data.path (a dataset URL or its manifest.json) and that the "
                            f"server is up (docs/data.md, Hosting shards)") from None
        return remote.dirname(where), where, data
    if data_path.endswith(".json") and os.path.isfile(data_path):
        path = data_path
    else:
        if not os.path.isdir(data_path):
            raise DataError(f"dataset directory {data_path} does not exist; create it with "
                            f"`{PREPARE_HINT.format(dir=data_path)}`")
        path = os.path.join(data_path, MANIFEST)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: {data_path} is not a prepared dataset; "
                            f"run `{PREPARE_HINT.format(dir=data_path)}`")
    with open(path, "rb") as f:
        return remote.dirname(path), path, f.read()


def load_manifest(data_path: str, retries: int = 3, retry_delay: float = 1.0) -> Manifest:
    """Parse and sanity-check the manifest of `data_path`; every problem is a one-line `DataError`."""
    base, path, data = _read_manifest(data_path, retries, retry_delay)
    try:
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else None
            raise DataError(f"{path} has format {got!r}, expected {FORMAT!r}; re-run memtrain.data.prepare")
        shards = [meta for s in raw["shards"] for meta in _expand(s)]
        int(raw["vocab_size"]), raw["tokenizer"]["file"], raw["tokenizer"]["sha256"]
        if raw["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{path}: dtype {raw['dtype']!r} is not uint16/uint32; re-run memtrain.data.prepare")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run memtrain.data.prepare")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is missing or has a malformed field ({exc!r}); re-run memtrain.data.prepare")
    return Manifest(base, raw, shards, hashlib.sha256(data).hexdigest(), retries, retry_delay)


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
