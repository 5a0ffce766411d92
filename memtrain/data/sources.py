"""Where documents come from: input globs, or the Python standard library's own source files.

A document is one text file, or one line of a .jsonl file (its "text" field); `.gz` versions of every
type are read transparently. Files are taken in sorted path order so the same inputs always give the
same documents, and bytes that are not UTF-8 are replaced (deterministically) instead of failing; files that
look binary (`drop_binary`) are skipped with a warning before that.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator

from memtrain.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",)
# Folders of the stdlib tree that are not the standard library itself (third-party or generated code).
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}
# A file is binary when its first SNIFF_BYTES hold a NUL byte or more than BINARY_SHARE of bytes that are not
# UTF-8 (random or compressed data: about half; Latin-1 prose: a few percent).
SNIFF_BYTES = 8192
BINARY_SHARE = 0.3
_UNDECODABLE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Document:
    source: str
    """Where the text came from: a path, or `path:LINE` for a .jsonl line."""
    text: str


def _base_suffix(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files matched by the globs (`**` recurses), sorted and de-duplicated; every glob must match a file."""
    files: set[str] = set()
    for pattern in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(f"--input {pattern!r} matches no files; check the path (quote globs so the shell keeps them)")
        for path in matched:
            if _base_suffix(path) not in SUFFIXES:
                raise DataError(f"{path}: unsupported file type; --input takes {', '.join(SUFFIXES)} (optionally .gz)")
            files.add(os.path.normpath(path))
    return sorted(files)


def stdlib_root() -> str:
    """The directory of the running interpreter's standard library (where `os.py` lives)."""
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return os.path.realpath(root)


def stdlib_files(max_files: int | None = None, max_bytes: int | None = None) -> list[str]:
    """The stdlib's .py files in sorted relative-path order, cut at `max_files` files or `max_bytes` bytes."""
    root = stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    found.sort(key=lambda p: os.path.relpath(p, root))
    if not found:
        raise DataError(f"no .py files under the standard library at {root}; pass --input GLOB instead of --source stdlib")
    out: list[str] = []
    total = 0
    for path in found:
        if max_files is not None and len(out) >= max_files:
            break
        size = os.path.getsize(path)
        if max_bytes is not None and out and total + size > max_bytes:
            break
        out.append(path)
        total += size
    return out


def _read_bytes(path: str, limit: int = -1) -> bytes:
    """The (decompressed) bytes of `path`, or its first `limit` of them."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read(limit)
        with open(path, "rb") as f:
            return f.read(limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__}: {exc}); fix or remove the file")


def binary_reason(path: str) -> str | None:
    """Why `path` looks binary rather than UTF-8 text, judged by its first 8 KiB (decompressed), or None.

    Binary bytes would not fail later: they decode to replacement characters and junk pieces that bloat the
    tokenizer's alphabet, so a stray image or archive in the corpus must be caught here.
    """
    head = _read_bytes(path, SNIFF_BYTES)
    if b"\0" in head:
        return f"a NUL byte in its first {SNIFF_BYTES // 1024} KiB"
    # surrogateescape maps each byte that is not UTF-8 to one lone surrogate, so they can be counted.
    bad = len(_UNDECODABLE.findall(head.decode("utf-8", errors="surrogateescape")))
    if head and bad / len(head) > BINARY_SHARE:
        return f"{bad / len(head):.0%} of its first {SNIFF_BYTES // 1024} KiB is not UTF-8"
    return None


def drop_binary(paths: list[str]) -> list[str]:
    """`paths` without the files that look binary, each named in a warning on stderr; an error if none is left."""
    kept = []
    for path in paths:
        reason = binary_reason(path)
        if reason is None:
            kept.append(path)
        else:
            print(f"warning: skipping {path}: it looks binary ({reason}); convert it to UTF-8 text or leave it out "
                  f"of --input", file=sys.stderr)
    if paths and not kept:
        raise DataError(f"all {len(paths)} input file(s) look binary (see the warnings above); --input takes UTF-8 text")
    return kept


def read_documents(paths: list[str]) -> Iterator[Document]:
    """Documents of `paths` in order; empty documents are dropped (they would carry no tokens)."""
    for path in paths:
        text = _read_bytes(path).decode("utf-8", errors="replace")
        if _base_suffix(path) != ".jsonl":
            if text.strip():
                yield Document(path, text)
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix the line or remove it")
            doc = record.get("text") if isinstance(record, dict) else None
            if not isinstance(doc, str):
                raise DataError(f"{path}:{lineno}: needs a string \"text\" field; fix the line or remove it")
            if doc.strip():
                yield Document(f"{path}:{lineno}", doc)
