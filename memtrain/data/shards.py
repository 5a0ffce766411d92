"""The shard format: a webdataset tar whose samples hold one document's token array each.

A sample is the tar members `KEY.tokens.npy` (a 1-D uint16/uint32 array) plus optional extra fields such as
`KEY.answer.txt` or `KEY.meta.json` (long-context tasks), so `webdataset.WebDataset(url).decode()` reads a
shard like any other. Tars are written byte-identically for the same samples: fixed member order, mtime 0,
uid/gid 0, empty owner names, mode 0444, and written through a temporary file so a crash never leaves a
half shard under the final name.

Reading does not go through webdataset: the whole shard is read into memory (shards are a few MB), its
sha256 checked against the manifest, and the tar parsed from memory, so a corrupt, truncated or tampered
shard becomes one `ShardError` naming the file instead of an exception deep inside a library.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np

from memtrain.data.errors import DataError

TOKENS = "tokens.npy"


class ShardError(DataError):
    """A shard that cannot be used: unreadable, corrupt, or not what the manifest says."""


@dataclass
class Sample:
    key: str
    tokens: np.ndarray
    fields: dict[str, bytes] = field(default_factory=dict)
    """Extra members of the sample by suffix (e.g. `answer.txt`), raw bytes."""


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 when every id fits (halves the disk and read bandwidth), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: str, samples: list[tuple[str, np.ndarray, dict[str, bytes]]]) -> tuple[str, int]:
    """Write `(key, tokens, extra_fields)` samples to `path`; returns (sha256, size in bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, tokens, extras in samples:
            members = [(TOKENS, _npy_bytes(tokens))] + sorted(extras.items())
            for suffix, payload in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest(), len(data)


def _parse_tokens(path: str, name: str, payload: bytes, dtype: str | None) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(f"shard {path}: member {name} is not a valid .npy array ({exc}); re-run memtrain.data.prepare")
    if arr.ndim != 1 or (dtype is not None and arr.dtype != np.dtype(dtype)):
        raise ShardError(f"shard {path}: member {name} has dtype {arr.dtype} shape {arr.shape}, "
                         f"manifest says 1-D {dtype}; re-run memtrain.data.prepare")
    return arr


def read_shard(path: str, sha256: str | None = None, dtype: str | None = None,
               vocab_size: int | None = None) -> list[Sample]:
    """All samples of a shard, in order; raises `ShardError` naming `path` on any problem, including (when
    `vocab_size` is given) a token id >= `vocab_size`, which would otherwise fail deep inside the model."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ShardError(f"shard {path} cannot be read ({exc.strerror or exc}); re-run memtrain.data.prepare or restore it")
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ShardError(f"shard {path} has sha256 {got[:12]}…, manifest says {sha256[:12]}…; "
                             f"the file changed or is truncated: re-run memtrain.data.prepare")
    samples: list[Sample] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > len(data):
                    raise ShardError(f"shard {path} is truncated inside member {info.name}; re-run memtrain.data.prepare")
                payload = data[info.offset_data:info.offset_data + info.size]
                base = os.path.basename(info.name)
                key, dot, suffix = base.partition(".")
                if not dot:
                    raise ShardError(f"shard {path}: member {info.name} has no KEY.SUFFIX name; not a memtrain shard")
                if not samples or samples[-1].key != key:
                    samples.append(Sample(key, np.empty(0, np.uint32)))
                if suffix == TOKENS:
                    samples[-1].tokens = _parse_tokens(path, info.name, payload, dtype)
                    samples[-1].fields.setdefault("__tokens_seen__", b"")
                else:
                    samples[-1].fields[suffix] = payload
    except (tarfile.TarError, EOFError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise ShardError(f"shard {path} is not a readable tar ({exc}); it is corrupt or truncated: re-run memtrain.data.prepare")
    for s in samples:
        if s.fields.pop("__tokens_seen__", None) is None:
            raise ShardError(f"shard {path}: sample {s.key} has no {TOKENS} member; re-run memtrain.data.prepare")
    if vocab_size is not None:
        _check_ids(path, samples, vocab_size)
    return samples


def _check_ids(path: str, samples: list[Sample], vocab_size: int) -> None:
    """One vectorised max per sample: cheap next to reading the shard (shard dtypes are unsigned: no min needed)."""
    for s in samples:
        if len(s.tokens) and int(s.tokens.max()) >= vocab_size:
            raise ShardError(f"shard {path}: sample {s.key} holds token id {int(s.tokens.max())}, outside the "
                             f"manifest's vocabulary of {vocab_size} (the shards were made with another tokenizer, or "
                             f"are corrupt); re-run memtrain.data.prepare with the dataset's tokenizer")
