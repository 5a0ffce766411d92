"""Peak memory and time of one training step (forward + backward) per activation-checkpoint mode.

    python benchmarks/activation_checkpoint.py [--memory mac] [--tokens 4096] [--d-model 256] [--layers 4]

Each mode (none, full, selective) runs in a fresh process, so the process's peak resident memory (ru_maxrss)
after the step, minus its value once the model and batch exist, is the step's own peak: activations kept for
the backward plus what the backward recomputes and its gradients (on CUDA: the allocator's peak instead). One
JSON line per mode, then a line with the ratios to `none` measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODES = ("none", "full", "selective")


def child(args: argparse.Namespace) -> dict:
    import torch

    from memtrain.model import ModelConfig, build_model
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=4,
                      num_meta_tokens=16, window=512, max_seq_len=args.tokens, memory=args.memory,
                      attention_backend="sdpa")
    cfg.titans.segment_len, cfg.titans.chunk_size, cfg.rmt.segment_len = 512, 64, 512
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg).to(device)
    model.set_activation_checkpoint(args.child)
    ids = torch.randint(0, 512, (1, args.tokens), device=device)
    warm = ids[:, :512]  # one segment: warms kernels, allocator pools and the gradient buffers
    model(warm, warm).loss.backward()
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    model(ids, ids).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"memory": args.memory, "mode": args.child, "tokens": args.tokens, "d_model": args.d_model,
            "layers": args.layers, "device": device.type, "peak_mib": round(peak, 1), "step_s": round(seconds, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default="mac", help="model.memory of the model measured")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--memory", args.memory,
               "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--layers", str(args.layers)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"mode {mode} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[mode]), flush=True)
    base = rows["none"]
    print(json.dumps({"ratios_to_none": {m: {"peak": round(r["peak_mib"] / base["peak_mib"], 3),
                                            "time": round(r["step_s"] / base["step_s"], 3)}
                                        for m, r in rows.items()}}))


if __name__ == "__main__":
    main()
