"""Where shards and manifests live: local paths, `http(s)://` URLs, `pipe:COMMAND`, or any scheme webdataset opens.

`open_url` is the one way the data path opens a byte stream. Local paths, `file:`, `pipe:` (e.g.
`pipe:aws s3 cp s3://bucket/train-000000.tar -`) and webdataset's other schemes (`gs:`, `ais:`, `hf:`) go
through `webdataset.gopen.gopen`. `http(s)://` is opened with the standard library's `urllib` instead of
webdataset's default (a `curl` subprocess with 30 retries of its own): the retries and backoff of the data path
(`with_retries`, docs/data.md "Faults") must be the only ones, so that a dead server costs seconds, not minutes.
"""
from __future__ import annotations

import http.client
import os
import posixpath
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Callable, TypeVar

from webdataset.gopen import gopen as wds_gopen

from memtrain.data.errors import DataError

# Seconds an HTTP connect or read may block before it counts as a failed try (a stalled server is retried).
TIMEOUT_S = 60.0
# What a failed download raises: network and pipe errors (webdataset's Pipe raises IOError on a non-zero
# exit), a short HTTP body, a refused connection. Corrupt *content* is a ShardError and is never retried.
TRANSIENT = (OSError, http.client.HTTPException, EOFError)

T = TypeVar("T")


def is_url(path: str) -> bool:
    """True for `scheme://...` and `pipe:...`; False for local paths (Windows drive letters included)."""
    if path.startswith("pipe:"):
        return True
    scheme = urllib.parse.urlparse(path).scheme
    return len(scheme) > 1 and "://" in path


def join(base: str, name: str) -> str:
    """`name` resolved against the dataset location `base` (a directory or a URL ending in `/`).

    Absolute URLs and `pipe:` commands are kept as they are, so a manifest may mix relative files with
    shards on other servers or buckets.
    """
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(base):
        return urllib.parse.urljoin(base if base.endswith("/") else base + "/", name)
    return os.path.join(base, name)


def display(url: str) -> str:
    """`url` for messages: a URL's query (which may hold a signature) is cut off."""
    if url.startswith("http://") or url.startswith("https://"):
        p = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((p.scheme, p.netloc, p.path, "", ""))
    return url


def open_url(url: str, timeout: float = TIMEOUT_S) -> IO[bytes]:
    """A readable binary stream of `url`; raises one of `TRANSIENT` when it cannot be opened."""
    if url.startswith("http://") or url.startswith("https://"):
        try:
            return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http(s) only, checked above)
        except urllib.error.HTTPError as exc:
            # an HTTPError is also a response object: close it, and keep only the status in the message
            exc.close()
            raise OSError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(str(exc.reason)) from None
    try:
        return wds_gopen(url, "rb")
    except ValueError as exc:  # webdataset's answer to an unknown scheme
        raise DataError(f"{url}: {exc}; use a local path, http(s)://, or pipe:COMMAND (e.g. pipe:aws s3 cp URL -)")


def with_retries(what: str, fn: Callable[[], T], retries: int, delay: float) -> T:
    """`fn()`, retried `retries` times on a transient error with delays `delay, 2*delay, 4*delay...`.

    After the last try it raises `DataError` naming `what` and the last error, on one line.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except TRANSIENT as exc:
            last = exc
            if attempt < retries:
                time.sleep(delay * 2 ** attempt)
    raise DataError(f"{what} could not be read after {retries + 1} tries ({_reason(last)})")


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_bytes(url: str, retries: int, delay: float) -> bytes:
    """The whole content of a small file (a manifest, a tokenizer), with retries."""
    def read() -> bytes:
        with open_url(url) as f:
            return f.read()
    return with_retries(display(url), read, retries, delay)


def cache_dir() -> str:
    """Where remote tokenizers are kept: `$MEMTRAIN_CACHE`, else `~/.cache/memtrain` (files named by sha256)."""
    return os.environ.get("MEMTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memtrain")


def dirname(url: str) -> str:
    """The location `url` is in (for a manifest: the dataset's base, ending in `/` for URLs)."""
    if is_url(url):
        p = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((p.scheme, p.netloc, posixpath.dirname(p.path) + "/", "", ""))
    return os.path.dirname(os.path.abspath(url))
