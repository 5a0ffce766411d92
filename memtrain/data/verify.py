"""`python -m memtrain.data.verify DIR`: check every shard against the manifest and print a summary.

Each shard must be readable, match its sha256, hold the manifest's document and token counts, and contain
only ids below the vocabulary size; the tokenizer must match its checksum and vocabulary size. Each problem is
one `BAD name: reason` line on stderr and the exit code is 1; a directory that is not a dataset exits 2.
"""
from __future__ import annotations

import sys

from memtrain.data.errors import DataError, ArgumentParser, run_cli
from memtrain.data.manifest import Manifest, check_tokenizer, load_manifest
from memtrain.data.shards import ShardError, read_shard


def verify(manifest: Manifest) -> list[tuple[str, str]]:
    """(name, reason) of every bad file in the dataset; empty when all is well."""
    bad: list[tuple[str, str]] = []
    try:
        check_tokenizer(manifest)
    except DataError as exc:
        bad.append((manifest.raw["tokenizer"]["file"], str(exc)))
    for meta in manifest.shards:
        path = manifest.path(meta)
        try:
            samples = read_shard(path, meta.sha256, manifest.dtype)
        except ShardError as exc:
            bad.append((meta.file, str(exc)))
            continue
        tokens = sum(len(s.tokens) for s in samples)
        top = max((int(s.tokens.max()) for s in samples if len(s.tokens)), default=-1)
        if len(samples) != meta.docs or tokens != meta.tokens:
            bad.append((meta.file, f"holds {len(samples)} docs / {tokens} tokens, manifest says "
                                   f"{meta.docs} / {meta.tokens}"))
        elif top >= manifest.vocab_size:
            bad.append((meta.file, f"token id {top} is outside the vocabulary of {manifest.vocab_size}"))
    return bad


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m memtrain.data.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="prepared dataset directory")
    args = p.parse_args(argv)
    manifest = load_manifest(args.dir)
    bad = verify(manifest)
    for name, reason in bad:
        print(f"BAD {name}: {reason}", file=sys.stderr)
    t = manifest.raw["totals"]
    splits = ", ".join(f"{k} {v['shards']} shards / {v['docs']} docs / {v['tokens']:,} tokens"
                       for k, v in sorted(manifest.raw["splits"].items()))
    print(f"{args.dir}: {t['shards']} shards, {t['docs']} docs, {t['tokens']:,} tokens ({splits}); "
          f"vocab {manifest.vocab_size} {manifest.dtype}; {len(bad)} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    run_cli(main)
