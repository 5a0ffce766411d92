"""`python -m memtrain.data.prepare`: text files → sentencepiece tokenizer → webdataset token shards + manifest.

    python -m memtrain.data.prepare --input 'corpus/**/*.jsonl.gz' --out data_cache/mine
    python -m memtrain.data.prepare --source stdlib --out data_cache/stdlib        # the offline default corpus

Two passes over the inputs, so memory stays bounded by one batch of documents plus one open shard per split:
the first samples lines (seeded reservoir) to train the tokenizer, the second tokenizes in parallel and writes
shards. Every `--val-every`-th document (the first included) is held out into `val-*.tar` shards. Nothing
depends on the clock or on `--workers`, so the same inputs give byte-identical shards and manifest.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

from memtrain.data.errors import DataError, ArgumentParser, run_cli
from memtrain.data.manifest import ShardMeta, build_manifest, write_manifest
from memtrain.data.shards import dtype_for_vocab, write_shard
from memtrain.data.sources import drop_binary, expand_inputs, read_documents, stdlib_files, stdlib_root
from memtrain.data.tokenizer import Tokenizer, train_tokenizer

TOKENIZER_FILE = "tokenizer.model"
# Docs handed to sentencepiece per encode call: large enough to keep its threads busy, small enough for memory.
_BATCH_DOCS = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m memtrain.data.prepare", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="GLOB", help="text files (.txt .md .py .jsonl, .gz too); repeatable")
    src.add_argument("--source", choices=["stdlib"], help="a built-in corpus: the Python standard library's .py files")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training a tokenizer (default 8192)")
    p.add_argument("--tokenizer", metavar="FILE", help="use this sentencepiece .model instead of training one")
    p.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard before a new one starts")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tokenizer threads")
    p.add_argument("--val-every", type=int, default=100,
                   help="hold out every N-th document (the first included) as the val split; 0 = no val split")
    p.add_argument("--max-files", type=int, help="use at most N input files (in sorted order)")
    p.add_argument("--max-bytes", type=int, help="stop adding input files after N bytes")
    p.add_argument("--tokenizer-sentences", type=int, default=300_000,
                   help="lines sampled (seeded) to train the tokenizer; bounds training time")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer's line sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("shard_tokens", "workers", "tokenizer_sentences"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.val_every < 0 or args.val_every == 1:
        p.error("--val-every must be 0 (no val split) or >= 2")
    return args


def resolve_files(args: argparse.Namespace) -> tuple[list[str], dict]:
    if args.source == "stdlib":
        files = stdlib_files(args.max_files, args.max_bytes)
        return files, {"kind": "stdlib", "root": stdlib_root(), "python": sys.version.split()[0]}
    files = expand_inputs(args.input)
    if args.max_files is not None:
        files = files[: args.max_files]
    if args.max_bytes is not None:
        kept, total = [], 0
        for f in files:
            if kept and total + os.path.getsize(f) > args.max_bytes:
                break
            kept.append(f)
            total += os.path.getsize(f)
        files = kept
    # Only --input is sniffed: the stdlib corpus is the interpreter's own source, and skipping its few non-UTF-8
    # test files would change the default dataset.
    return drop_binary(files), {"kind": "files", "inputs": list(args.input)}


def sample_lines(files: list[str], k: int, seed: int) -> list[str]:
    """A seeded reservoir sample of k non-blank lines (sentencepiece trains on lines)."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for doc in read_documents(files):
        for line in doc.text.split("\n"):
            if not line.strip() or len(line) > 4096:
                continue
            if len(reservoir) < k:
                reservoir.append(line)
            else:
                j = rng.randrange(seen + 1)
                if j < k:
                    reservoir[j] = line
            seen += 1
    return reservoir


def _training_error(exc: DataError, files: list[str], lines: list[str], args: argparse.Namespace) -> DataError:
    """sentencepiece's failure restated as its cause, with how much text it had, and the fix for that cause."""
    msg, vocab_size = str(exc), args.vocab_size
    more = "raise --tokenizer-sentences" if len(lines) >= args.tokenizer_sentences else "add input files"
    read = (f"the tokenizer sample ({len(lines):,} lines, {sum(map(len, lines)):,} characters from "
            f"{len(files)} file(s))")
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if too_high:
        return DataError(f"{read} is too little text for --vocab-size {vocab_size}: it yields at most "
                         f"{too_high.group(2)} pieces; pass --vocab-size {too_high.group(2)} or less, or {more}")
    chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if chars:
        return DataError(f"{read} needs {chars.group(2)} pieces for its distinct characters alone, more than "
                         f"--vocab-size {vocab_size}; raise --vocab-size to at least {chars.group(2)}, or leave "
                         f"out inputs in other alphabets or with non-text content")
    if msg.startswith("sentencepiece could not train"):  # another sentencepiece failure: keep its words, add the size
        return DataError(f"{msg.rsplit('; lower --vocab-size', 1)[0]} (trained on {read})")
    return exc  # the recipe's own checks (vocabulary below the minimum, no text) already say what to change


class _SplitWriter:
    """Collects one split's documents and writes a shard each time `shard_tokens` is reached."""

    def __init__(self, out: str, split: str, dtype: str, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardMeta] = []

    def add(self, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}-{len(self.shards):06d}.tar"
        stem = name[:-4]
        samples = [(f"{stem}-{i:06d}", arr, {}) for i, arr in enumerate(self.pending)]
        digest, size = write_shard(os.path.join(self.out, name), samples)
        self.shards.append(ShardMeta(name, self.split, len(self.pending), self.pending_tokens, size, digest))
        self.pending, self.pending_tokens = [], 0


def _remove_stale(out: str, keep: set[str]) -> None:
    for name in os.listdir(out):
        if name.endswith(".tar") and name.split("-")[0] in ("train", "val") and name not in keep:
            os.remove(os.path.join(out, name))


def prepare(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    files, source = resolve_files(args)
    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, TOKENIZER_FILE)
    if args.tokenizer:
        given = Tokenizer(args.tokenizer)
        if os.path.abspath(given.path) != os.path.abspath(tok_path):
            shutil.copyfile(given.path, tok_path)
        tok = Tokenizer(tok_path)
    else:
        lines = sample_lines(files, args.tokenizer_sentences, args.seed)
        try:
            tok = train_tokenizer(lines, tok_path, args.vocab_size)
        except DataError as exc:
            raise _training_error(exc, files, lines, args) from None
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: _SplitWriter(args.out, s, dtype, args.shard_tokens) for s in ("train", "val")}
    sizes = {f: os.path.getsize(f) for f in files}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="tokenize", disable=args.quiet,
               file=sys.stderr)
    n_docs = 0
    batch: list[str] = []

    def encode(texts: list[str]) -> None:
        nonlocal n_docs
        for ids in tok.encode_batch(texts, args.workers):
            held_out = args.val_every and n_docs % args.val_every == 0
            writers["val" if held_out else "train"].add(ids)
            n_docs += 1

    last_file = None
    for doc in read_documents(files):
        path = doc.source.rsplit(":", 1)[0] if doc.source not in sizes else doc.source
        if path != last_file and last_file is not None:
            bar.update(sizes.get(last_file, 0))
        last_file = path
        batch.append(doc.text)
        if len(batch) >= _BATCH_DOCS:
            encode(batch)
            batch = []
    encode(batch)
    bar.update(sizes.get(last_file, 0) if last_file else 0)
    bar.close()
    for w in writers.values():
        w.flush()
    if not writers["train"].shards:
        raise DataError(f"{len(files)} input file(s) gave {n_docs} document(s), too few for a train split; "
                        f"add inputs or pass --val-every 0")
    shards = writers["train"].shards + writers["val"].shards
    _remove_stale(args.out, {s.file for s in shards})
    extra = {"source": {**source, "files": len(files), "bytes": sum(sizes.values())},
             "prepare": {"vocab_size": None if args.tokenizer else args.vocab_size, "val_every": args.val_every,
                         "shard_tokens": args.shard_tokens, "tokenizer_sentences": args.tokenizer_sentences,
                         "seed": args.seed, "trained_tokenizer": not args.tokenizer}}
    raw = build_manifest(tok, TOKENIZER_FILE, dtype, shards, extra)
    write_manifest(args.out, raw)
    raw["_seconds"] = time.perf_counter() - start
    return raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = prepare(args)
    sp = raw["splits"]
    val = sp.get("val", {"docs": 0, "tokens": 0, "shards": 0})
    print(f"prepared {args.out}: {raw['totals']['docs']} docs, {raw['totals']['tokens']:,} tokens in "
          f"{raw['totals']['shards']} shards (train {sp['train']['tokens']:,} tokens / {sp['train']['shards']} shards, "
          f"val {val['tokens']:,} / {val['shards']}), vocab {raw['vocab_size']} {raw['dtype']}, "
          f"{raw['_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
