"""`python benchmarks/data.py [--sizes-mb 64 512] [--dir DIR]`: one JSON line per measurement.

Synthetic token shards (uint16, documents of 1-8K tokens) are written to a temp dir, one dataset per shard size;
each measurement runs in a fresh subprocess so its peak RSS (`ru_maxrss`) is its own:
- `shard_read`: one whole shard to documents, by the old hand-written reader (kept here only for this comparison:
  read the file, sha256 it, parse the tar in memory) and by `memtrain.data.shards.iter_shard` (webdataset,
  streamed) from local disk and from a localhost HTTP server (`memtrain.data.testing.ShardServer`).
- `stream`: packed windows (seq_len 2048, batch 8) from one `PackedReader`, i.e. one DataLoader worker at DP=1,
  local and HTTP, for `--seconds` seconds.
- `downloads` (`--downloads DP`): a job of DP ranks streaming one epoch of 8 shards from the HTTP server with
  `data.lanes` 1 and DP (docs/data.md "Lanes"): bytes of the distinct shards each rank opens, their sum over
  the dataset's size, and each rank's packed tokens/s.
`--dir DIR` also measures the stream on a prepared dataset (e.g. data_cache/stdlib). See docs/data.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from memtrain.data.errors import ArgumentParser, run_cli  # noqa: E402

SEQ_LEN, BATCH = 2048, 8


def _npy(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def make_dataset(out: str, shard_mb: int, shards: int = 1, seed: int = 0, tokenizer_from: str | None = None) -> str:
    """`shards` shards of about `shard_mb` MB each plus a manifest, written member by member (bounded memory).
    `tokenizer_from`: a prepared dataset whose tokenizer (and vocabulary) the manifest takes, so that a `Stream`
    (which checks the tokenizer) can read it; by default a placeholder only `PackedReader` accepts."""
    os.makedirs(out, exist_ok=True)
    tokenizer, vocab = {"file": "none.model", "sha256": "0" * 64, "vocab_size": 8192}, 8192
    if tokenizer_from:
        tokenizer = json.load(open(os.path.join(tokenizer_from, "manifest.json")))["tokenizer"]
        vocab = tokenizer["vocab_size"]
        shutil.copy(os.path.join(tokenizer_from, tokenizer["file"]), os.path.join(out, tokenizer["file"]))
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(shards):
        name = f"train-{i:06d}.tar"
        path = os.path.join(out, name)
        docs = tokens = 0
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            while os.path.getsize(path) < shard_mb * 1e6:
                arr = rng.integers(4, vocab, size=int(rng.integers(1024, 8192)), dtype=np.uint16)
                payload = _npy(arr)
                info = tarfile.TarInfo(f"{name[:-4]}-{docs:08d}.tokens.npy")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                docs, tokens = docs + 1, tokens + len(arr)
                tar.fileobj.flush()
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
        entries.append({"file": name, "split": "train", "docs": docs, "tokens": tokens,
                        "bytes": os.path.getsize(path), "sha256": sha.hexdigest()})
    raw = {"format": "memtrain-shards/1", "vocab_size": vocab, "dtype": "uint16", "shards": entries,
           "tokenizer": tokenizer}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(raw, f)
    return out


def old_read_shard(path: str, sha256: str) -> list[np.ndarray]:
    """The reader memtrain had before webdataset streaming: the whole shard in memory, then parsed."""
    with open(path, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == sha256
    docs = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            payload = data[info.offset_data:info.offset_data + info.size]
            docs.append(np.load(io.BytesIO(payload), allow_pickle=False))
    return docs


def child(kind: str, location: str, seconds: float) -> dict:
    """One measurement, in this (fresh) process."""
    from memtrain.data.manifest import load_manifest
    from memtrain.data.reader import PackedReader
    from memtrain.data.shards import iter_shard
    m = load_manifest(location)
    meta = m.shards[0]
    start = time.perf_counter()
    tokens = 0
    if kind == "old":
        tokens = sum(len(d) for d in old_read_shard(m.path(meta), meta.sha256))
    elif kind == "stream_shard":
        for s in iter_shard(m.path(meta), sha256=meta.sha256, dtype=m.dtype, vocab_size=m.vocab_size,
                            docs=meta.docs, tokens=meta.tokens):
            tokens += len(s.tokens)
    elif kind == "packed":
        reader = PackedReader(m, "train", seed=0, shuffle_buffer=1024, shuffle=True, skip_bad=False, eos_id=2)
        reader.windows(0, BATCH, 0, SEQ_LEN)  # warm-up: first block
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            reader.windows(0, BATCH, 0, SEQ_LEN)
            tokens += BATCH * SEQ_LEN
    dt = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def downloads(dp: int, shard_mb: int, tmp: str) -> list[dict]:
    """One epoch of a DP-rank job over HTTP at 1 and `dp` lanes; the ranks run one after another here."""
    from memtrain.data.config import DataConfig
    from memtrain.data.stream import build_stream
    from memtrain.data.testing import ShardServer, tiny_dataset
    ds = make_dataset(os.path.join(tmp, "lanes"), shard_mb, shards=8, tokenizer_from=tiny_dataset(tmp))
    raw = json.load(open(os.path.join(ds, "manifest.json")))
    size = {s["file"]: s["bytes"] for s in raw["shards"]}
    out = []
    with ShardServer(ds) as srv:
        for lanes in (1, dp):
            ranks = []
            for rank in range(dp):
                srv.requests.clear()
                cfg = DataConfig(path=srv.url, seq_len=SEQ_LEN, batch_size=BATCH // dp, lanes=lanes, shuffle_buffer=64)
                stream = build_stream(cfg, dp_rank=rank, dp_size=dp)
                start, tokens = time.perf_counter(), 0
                while stream.epoch == 0:
                    tokens += next(stream).inputs.numel()
                dt = time.perf_counter() - start
                ranks.append({"rank": rank, "bytes": sum(size.get(r, 0) for r in set(srv.requests)),
                              "tokens_per_s": round(tokens / dt)})
            out.append({"bench": "downloads", "dp": dp, "lanes": lanes, "shard_mb": shard_mb,
                        "dataset_mb": round(sum(size.values()) / 1e6, 1),
                        "downloaded_over_dataset": round(sum(r["bytes"] for r in ranks) / sum(size.values()), 2),
                        "ranks": [{"rank": r["rank"], "mb": round(r["bytes"] / 1e6, 1), "tokens_per_s": r["tokens_per_s"]}
                                  for r in ranks]})
    return out


def run_child(kind: str, location: str, seconds: float) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, location, str(seconds)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python benchmarks/data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 512], help="shard sizes to generate")
    p.add_argument("--seconds", type=float, default=3.0, help="time per stream measurement")
    p.add_argument("--dir", help="also measure the stream on this prepared dataset")
    p.add_argument("--downloads", type=int, metavar="DP", help="only the downloads of a DP-rank job, lanes 1 vs DP")
    p.add_argument("--child", nargs=3, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], float(args.child[2]))))
        return 0
    if args.downloads:
        with tempfile.TemporaryDirectory(prefix="memtrain-bench-") as tmp:
            for row in downloads(args.downloads, min(args.sizes_mb), tmp):
                print(json.dumps(row), flush=True)
        return 0
    from memtrain.data.testing import ShardServer
    base = run_child("none", make_dataset(tempfile.mkdtemp(prefix="bench-base-"), 1), 0)
    print(json.dumps({"bench": "baseline_process", "peak_rss_mb": base["peak_rss_mb"]}), flush=True)
    with tempfile.TemporaryDirectory(prefix="memtrain-bench-") as tmp:
        for mb in args.sizes_mb:
            t0 = time.perf_counter()
            ds = make_dataset(os.path.join(tmp, f"s{mb}"), mb)
            made = time.perf_counter() - t0
            with ShardServer(ds) as srv:
                for kind, loc in (("old", ds), ("stream_shard", ds), ("stream_shard", srv.url),
                                  ("packed", ds), ("packed", srv.url)):
                    r = run_child(kind, loc, args.seconds)
                    print(json.dumps({"bench": "shard_read" if kind != "packed" else "stream", "shard_mb": mb,
                                      "reader": "old_in_memory" if kind == "old" else "webdataset_streaming",
                                      "source": "http" if loc.startswith("http") else "local", **r,
                                      "generate_s": round(made, 1)}), flush=True)
            for name in os.listdir(ds):
                os.remove(os.path.join(ds, name))
    if args.dir:
        r = run_child("packed", args.dir, args.seconds)
        print(json.dumps({"bench": "stream", "dataset": args.dir, "source": "local", **r}), flush=True)
    return 0


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    run_cli(main)
