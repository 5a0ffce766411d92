"""`python -m memtrain.data.tasks`: generate a seeded long-context task dataset.

    python -m memtrain.data.tasks --task niah_single --data data_cache/stdlib --length 4096 --num 50 --out data_cache/niah4k
    python -m memtrain.data.tasks --task qa2 --data data_cache/stdlib --length 8192 --num 100 --train-num 1000 --out DIR

The tokenizer (and, for `--filler corpus`, the filler text) come from the prepared dataset `--data`, so task
tokens match the model's training data. Example i of a split depends only on (task, seed, split, i).
"""
from __future__ import annotations

import argparse
import random
import sys

from tqdm import tqdm

from memtrain.data.errors import ArgumentParser, run_cli
from memtrain.data.manifest import check_tokenizer, load_manifest
from memtrain.data.tasks import TASKS
from memtrain.data.tasks.babi import babi
from memtrain.data.tasks.filler import Filler
from memtrain.data.tasks.niah import niah_single
from memtrain.data.tasks.write import write_task_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m memtrain.data.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset: tokenizer and corpus filler")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--length", type=int, required=True, help="tokens per example (prompt + answer), exactly")
    p.add_argument("--num", type=int, default=100, help="examples in the val split (evaluation)")
    p.add_argument("--train-num", type=int, default=0, help="examples in the train split (0: no train split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", choices=["noise", "corpus"],
                   help="haystack text (default: noise for niah_single, corpus for qa1-qa3)")
    p.add_argument("--depth", type=float, help="niah_single needle depth in [0, 1] (default: uniform random)")
    p.add_argument("--events", type=int, default=12, help="qa1-qa3 story sentences (facts plus distractors)")
    p.add_argument("--shard-tokens", type=int, default=1_000_000)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.length < 1 or a.num < 1 or a.train_num < 0 or a.events < 3 or a.shard_tokens < 1:
        p.error("--length and --num must be >= 1, --train-num >= 0, --events >= 3, --shard-tokens >= 1")
    if a.depth is not None and not 0.0 <= a.depth <= 1.0:
        p.error("--depth must be in [0, 1]")
    return a


def generate(args: argparse.Namespace) -> dict:
    manifest = load_manifest(args.data)
    tok = check_tokenizer(manifest)
    kind = args.filler or ("noise" if args.task == "niah_single" else "corpus")
    filler = Filler(kind, tok, manifest)
    splits = {}
    for split, n in (("train", args.train_num), ("val", args.num)):
        if n == 0:
            continue
        out = []
        for i in tqdm(range(n), desc=f"{args.task} {split}", disable=args.quiet, file=sys.stderr):
            rng = random.Random(f"{args.task}/{args.seed}/{split}/{i}")
            if args.task == "niah_single":
                out.append(niah_single(tok, filler, rng, args.length, args.depth))
            else:
                out.append(babi(args.task, tok, filler, rng, args.length, args.events))
        splits[split] = out
    info = {"name": args.task, "length": args.length, "seed": args.seed, "filler": kind, "events": args.events,
            "depth": args.depth, "source_manifest_tokenizer_sha256": manifest.raw["tokenizer"]["sha256"]}
    return write_task_dataset(args.out, tok, splits, args.shard_tokens, info)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = generate(args)
    counts = ", ".join(f"{k} {v['docs']}" for k, v in sorted(raw["splits"].items()))
    print(f"wrote {args.out}: {args.task}, {raw['totals']['docs']} examples of {args.length} tokens "
          f"({counts}), {raw['totals']['shards']} shards")
    return 0


if __name__ == "__main__":
    run_cli(main)
