"""Activation memory per rank at tensor parallel 2, with and without sequence parallelism (parallel.sequence_parallel).

    python benchmarks/sequence_parallel.py [--memory none mag mac] [--tokens 4096] [--d-model 512] [--layers 4] \
        [--checkpoint none|selective|full]

Each (kind, layout) runs in a fresh pair of gloo ranks. A rank builds the model, runs one warm-up step, then measures
its resident memory (VmRSS) before the forward, after the forward (what autograd keeps for the backward: the
activations) and its peak during forward + backward. glibc is told to map every block of 64 KiB or more on its own
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and the deltas are the tensors'. One JSON
line per (kind, layout) and rank, then the ratios sp / no-sp measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, memory: str, sp: bool, out: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=False)
    from memtrain.launch.tensor_parallel import MegatronFactory
    from memtrain.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                      num_meta_tokens=16, window=512, max_seq_len=args.tokens, memory=memory,
                      attention_backend="sdpa")
    cfg.titans.segment_len, cfg.titans.chunk_size = 512, 64
    model = build_model(cfg, MegatronFactory(sequence_parallel=sp))
    model.set_activation_checkpoint(args.checkpoint)
    ids = torch.randint(0, 512, (1, args.tokens))
    model(ids, ids).loss.backward()  # warm-up: kernels, thread pools, gradient buffers
    model.zero_grad(set_to_none=False)
    dist.barrier()
    before = _rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = model(ids, ids).loss
    after_forward = _rss()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"memory": memory, "sequence_parallel": sp, "rank": rank, "tokens": args.tokens, "d_model": args.d_model,
           "layers": args.layers, "checkpoint": args.checkpoint, "activations_mib": round((after_forward - before) / 2**20, 1),
           "step_peak_mib": round((max(peak, peak_before) - before) / 2**20, 1) if peak > peak_before else None}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(row, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    import socket
    import tempfile

    import torch.multiprocessing as mp
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", nargs="+", default=["none", "mag", "mac"], help="model.memory kinds measured")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--checkpoint", default="none", choices=("none", "selective", "full"),
                   help="parallel.activation_checkpoint of the model measured")
    args = p.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the spawned ranks start
    results = {}
    for memory in args.memory:
        for sp in (False, True):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(_rank, args=(2, port, args, memory, sp, out), nprocs=2, join=True)
                rows = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(2)]
            for row in rows:
                print(json.dumps(row), flush=True)
            results[memory, sp] = max(r["activations_mib"] for r in rows)
    print(json.dumps({"activations_sp_over_no_sp": {m: round(results[m, True] / results[m, False], 3)
                                                    for m in args.memory}}))


if __name__ == "__main__":
    main()
