"""The shard format: a webdataset tar whose samples hold one document's token array each.

A sample is the tar members `KEY.tokens.npy` (a 1-D uint16/uint32 array) plus optional extra fields such as
`KEY.answer.txt` or `KEY.meta.json` (long-context tasks), so `webdataset.WebDataset(url).decode()` reads a
shard like any other. Tars are written byte-identically for the same samples: fixed member order, mtime 0,
uid/gid 0, empty owner names, mode 0444, and written through a temporary file so a crash never leaves a
half shard under the final name.

Reading streams a shard through webdataset (`remote.open_url` → `webdataset.tariterators` → sample grouping),
one sample at a time: memory holds one sample, never the shard. The manifest's sha256 is of the whole file,
so it is computed over the bytes as they stream past and compared when the shard's last byte has been read
(docs/data.md "Faults"): samples before the end have already been handed out by then. A corrupt, truncated or
tampered shard becomes one `ShardError` naming its URL instead of an exception deep inside a library; a failed
download is retried (with backoff) from the sample where it stopped before it becomes one.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import IO, Iterator

import numpy as np
from webdataset import tariterators

from memtrain.data import remote
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


class _Hashing:
    """A read-only stream that keeps the sha256 and size of every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (the tar's closing blocks and padding count in the file's checksum)."""
        while self.read(1 << 20):
            pass

    def finish(self) -> None:
        """After the last byte: a `pipe:` command's exit status (webdataset's Pipe raises IOError on failure),
        so a command that failed counts as a failed download, not as a corrupt shard."""
        if hasattr(self.raw, "wait_for_child"):
            self.raw.close()

    def close(self) -> None:
        try:
            self.raw.close()
        except remote.TRANSIENT:
            pass  # a pipe command stopped early by us exits with SIGPIPE or an error: nothing to report


def _parse_tokens(url: str, name: str, payload: bytes, dtype: str | None) -> np.ndarray:
    """The 1-D token array of a `.npy` payload, as a zero-copy read-only view of `payload`."""
    try:
        f = io.BytesIO(payload)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dt = read_header(f)
        if dt.hasobject:
            raise ValueError("object arrays are not token arrays")
        arr = np.frombuffer(payload, dtype=dt, count=math.prod(shape), offset=f.tell())
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(f"shard {url}: member {name} is not a valid .npy array ({exc}); re-run memtrain.data.prepare")
    if len(shape) != 1 or (dtype is not None and arr.dtype != np.dtype(dtype)):
        raise ShardError(f"shard {url}: member {name} has dtype {arr.dtype} shape {shape}, "
                         f"manifest says 1-D {dtype}; re-run memtrain.data.prepare")
    return arr


def _samples(stream: _Hashing, url: str, dtype: str | None, vocab_size: int | None) -> Iterator[Sample]:
    """The samples of one open tar stream, parsed and checked one at a time."""
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
    for group in tariterators.group_by_keys(files):
        key = os.path.basename(group.pop("__key__"))
        fields = {k: v for k, v in group.items() if not k.startswith("__")}
        if TOKENS not in fields:
            raise ShardError(f"shard {url}: sample {key} has no {TOKENS} member; re-run memtrain.data.prepare")
        tokens = _parse_tokens(url, f"{key}.{TOKENS}", fields.pop(TOKENS), dtype)
        # One vectorised max per sample (shard dtypes are unsigned: no min needed): an id >= vocab_size would
        # otherwise fail deep inside the model.
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise ShardError(f"shard {url}: sample {key} holds token id {int(tokens.max())}, outside the manifest's "
                             f"vocabulary of {vocab_size} (the shards were made with another tokenizer, or are "
                             f"corrupt); re-run memtrain.data.prepare with the dataset's tokenizer")
        yield Sample(key, tokens, fields)


def iter_shard(url: str, *, sha256: str | None = None, dtype: str | None = None, vocab_size: int | None = None,
               docs: int | None = None, tokens: int | None = None, start: int = 0, retries: int = 0,
               retry_delay: float = 1.0) -> Iterator[Sample]:
    """Samples `start, start+1, ...` of the shard at `url`, streamed; the file's checks run after its last byte.

    Samples before `start` are read and skipped (a resume lands inside at most one shard). A failed download
    (open or mid-stream) is retried `retries` times with delays `retry_delay * 2**k`, each retry reopening the
    shard and skipping to the sample it stopped at. Raises `ShardError` naming `url` when the shard cannot be
    read, is not a memtrain tar, holds ids >= `vocab_size`, or after its last byte does not match `sha256`,
    `docs` or `tokens` (then the samples before have been yielded already).
    """
    shown = remote.display(url)
    index, attempt = start, 0
    while True:
        stream: _Hashing | None = None
        try:
            stream = _Hashing(remote.open_url(url))
            seen, n_tokens = 0, 0
            try:
                for sample in _samples(stream, shown, dtype, vocab_size):
                    seen, n_tokens = seen + 1, n_tokens + len(sample.tokens)
                    if seen > index:
                        index += 1
                        yield sample
                stream.drain()
                stream.finish()
            except (tarfile.TarError, ValueError, EOFError, ShardError) as exc:
                if isinstance(exc, remote.TRANSIENT) and not isinstance(exc, DataError):
                    raise
                _check_sha(stream, shown, sha256, after_error=True)
                if isinstance(exc, ShardError):
                    raise
                raise ShardError(f"shard {shown} is not a readable tar ({_first_arg(exc)}); it is corrupt or "
                                 f"truncated: re-run memtrain.data.prepare or restore it") from None
            _check_sha(stream, shown, sha256)
            if (docs is not None and seen != docs) or (tokens is not None and n_tokens != tokens):
                raise ShardError(f"shard {shown} holds {seen} docs / {n_tokens} tokens, manifest says {docs} / "
                                 f"{tokens}; re-run memtrain.data.prepare")
            return
        except remote.TRANSIENT as exc:
            if isinstance(exc, DataError):
                raise
            if attempt >= retries:
                raise ShardError(f"shard {shown} could not be read after {attempt + 1} tries "
                                 f"({type(exc).__name__}: {_first_arg(exc)}); check the URL and the server, or "
                                 f"restore the file") from None
            time.sleep(retry_delay * 2 ** attempt)
            attempt += 1
        finally:
            if stream is not None:
                stream.close()


def _first_arg(exc: BaseException) -> str:
    # webdataset appends the stream objects and URL to an exception's args: keep the library's own message
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _check_sha(stream: _Hashing, url: str, sha256: str | None, after_error: bool = False) -> None:
    """A sha256 mismatch is reported before any other problem: it is the more basic explanation."""
    if sha256 is None:
        return
    if after_error:
        try:
            stream.drain()
        except remote.TRANSIENT:
            return
        stream.finish()  # raises (a failed download) when a pipe: command failed
    got = stream.sha.hexdigest()
    if got != sha256:
        raise ShardError(f"shard {url} has sha256 {got[:12]}…, manifest says {sha256[:12]}…; "
                         f"the file changed or is truncated: re-run memtrain.data.prepare or restore it")


def read_shard(path: str, sha256: str | None = None, dtype: str | None = None,
               vocab_size: int | None = None) -> list[Sample]:
    """All samples of a small shard (verify, task datasets, tests), with writable token arrays; the stream
    uses `iter_shard`, whose arrays are read-only views of the streamed bytes."""
    return [Sample(s.key, s.tokens.copy(), s.fields)
            for s in iter_shard(path, sha256=sha256, dtype=dtype, vocab_size=vocab_size)]
