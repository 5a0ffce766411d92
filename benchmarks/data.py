"""`python benchmarks/data.py [DIR]`: one JSON line per measurement; stream tokens/s per worker from shards on disk, and prepare's tokenize rate.

The stream target is >= 5M tokens/s per worker (a worker is one `SlotReader`, i.e. one DataLoader process);
the reader is measured alone and through `Stream` (tensor conversion included, num_workers=0).
Default DIR: data_cache/stdlib (made by `python -m memtrain.data.prepare --source stdlib --out data_cache/stdlib`).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from memtrain.data.config import DataConfig  # noqa: E402
from memtrain.data.errors import ArgumentParser, run_cli
from memtrain.data.manifest import check_tokenizer, load_manifest
from memtrain.data.reader import SlotReader
from memtrain.data.shards import read_shard
from memtrain.data.stream import build_stream


def _rate(step, tokens_per_step: int, seconds: float) -> float:
    step()  # warm-up: first block and shard reads
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * tokens_per_step / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="data_cache/stdlib")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = p.parse_args(argv)
    m = load_manifest(args.dir)
    tok = check_tokenizer(m)
    for seq_len, batch in ((256, 8), (2048, 8)):
        reader = SlotReader(m, "train", 0, 1, seq_len=seq_len, batch_size=batch, seed=0, shuffle_buffer=1024,
                            shuffle=True, skip_bad=False, eos_id=tok.eos_id)
        r = _rate(reader.next_batch, seq_len * batch, args.seconds)
        stream = build_stream(DataConfig(path=args.dir, seq_len=seq_len, batch_size=batch))
        s = _rate(lambda: next(stream), seq_len * batch, args.seconds)
        print(json.dumps({"bench": "stream", "seq_len": seq_len, "batch": batch,
                          "reader_tokens_per_s_per_worker": round(r), "stream_tokens_per_s": round(s),
                          "target_tokens_per_s_per_worker": 5_000_000}), flush=True)
    shards = m.split("train")[:2]
    docs = [tok.decode(s.tokens.tolist()) for sh in shards for s in read_shard(m.path(sh))]
    nbytes, ntok = sum(len(d.encode()) for d in docs), sum(sh.tokens for sh in shards)
    for threads in (1, 2):
        start = time.perf_counter()
        tok.encode_batch(docs, threads)
        dt = time.perf_counter() - start
        print(json.dumps({"bench": "prepare_tokenize", "threads": threads, "mb_per_s": round(nbytes / dt / 1e6, 2),
                          "tokens_per_s": round(ntok / dt)}), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
