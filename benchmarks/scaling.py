"""Training-step (forward + backward) time and memory vs sequence length: full attention, sliding window, MAC, RMT.

    python benchmarks/scaling.py                 # lengths 512 .. 8192, d_model 128, 2 layers, batch 1
    python benchmarks/scaling.py --quick         # d_model 32, lengths 512 .. 4096, one repeat (about a minute)
    python benchmarks/scaling.py --lengths 1024 4096 16384 --models full window

Prints one JSON line per (model, length) — seconds (best of --repeats after a warm-up step), tokens/s, activation
memory — then per model a "growth" line with the ratios largest/smallest length of time and memory and the fitted
exponent (slope of log y against log n over all lengths: ~1 linear, ~2 quadratic). All numbers of one
invocation are measured in the same process, so only ratios within one run are meant to be compared.

Memory is the peak of the tensors autograd saves for the backward (exact and deterministic; parameters excluded;
`SavedTensorMeter` of benchmarks/rmt.py), on CUDA also the allocator's peak above the memory in use before the step.
Models (same width, depth and heads): full = global causal attention (fused SDPA kernel: O(n) saved memory, n² work);
full_dense = the same with the reference kernel, which materialises and saves the [n, n] scores (O(n²) memory);
window = sliding window of --window tokens;
mac = Titans memory as context with segments of --segment tokens; rmt = RMT with --segment-token segments and
--memory memory tokens. Attention backend: sdpa (CPU: the blocked windowed path is linear in n; global causal
attention does n²/2 score work whatever the kernel, though a fused kernel saves only O(n) for the backward).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

MODELS = ("full", "full_dense", "window", "mac", "rmt")


def _meter_class():
    """SavedTensorMeter from benchmarks/rmt.py (loaded by path: benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_bench_rmt", os.path.join(ROOT, "benchmarks", "rmt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SavedTensorMeter


def build(name: str, args, n: int):
    from memtrain.model import ModelConfig, build_model
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=max(n, args.segment), attention_backend="sdpa")
    if name == "full_dense":
        cfg.attention_backend = "reference"  # the textbook kernel: the [n, n] scores are materialised and saved
    elif name == "window":
        cfg.window = args.window
    elif name == "mac":
        cfg.memory = "mac"
        cfg.titans.segment_len = args.segment
    elif name == "rmt":
        cfg.memory = "rmt"
        cfg.rmt.segment_len = args.segment
        cfg.rmt.num_memory = args.memory
    torch.manual_seed(0)
    return build_model(cfg).to(args.device)


def measure(name: str, args, n: int, meter_cls) -> dict:
    model = build(name, args, n)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, n), generator=g).to(args.device)
    targets = torch.randint(0, args.vocab, (args.batch, n), generator=g).to(args.device)

    def step():
        model.zero_grad(set_to_none=False)
        model(tokens, targets).loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: gradients allocated, kernels chosen
    best = math.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    meter = meter_cls(model.parameters())
    cuda_peak = None
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with meter.hooks():
        step()
    if args.device == "cuda":
        cuda_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    row = {"model": name, "n": n, "batch": args.batch, "seconds": round(best, 5),
           "tokens_per_s": round(args.batch * n / best, 1), "saved_mib": round(meter.peak / 2**20, 3)}
    if cuda_peak is not None:
        row["cuda_peak_mib"] = round(cuda_peak, 3)
    return row


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="d_model 32 (attention dominates sooner), lengths 512-4096, one repeat")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 512 1024 2048 4096 8192)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--d-model", type=int, default=None, help="width (default 128; 32 with --quick)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=128, help="sliding window of the window model")
    p.add_argument("--segment", type=int, default=128, help="segment length of MAC and RMT")
    p.add_argument("--memory", type=int, default=16, help="RMT memory tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    lengths = args.lengths or ([512, 1024, 2048, 4096] if args.quick else [512, 1024, 2048, 4096, 8192])
    args.d_model = args.d_model or (32 if args.quick else 128)
    if args.quick:
        args.repeats = 1
    bad = [n for n in lengths if n < 1 or n % args.segment]
    if bad or len(lengths) < 2:
        p.error(f"--lengths needs at least two lengths, each a positive multiple of --segment {args.segment}; "
                f"got {lengths}")
    torch.set_num_threads(args.threads)
    meter_cls = _meter_class()
    rows: dict[str, list[dict]] = {}
    for name in args.models:
        for n in sorted(lengths):
            row = measure(name, args, n, meter_cls)
            rows.setdefault(name, []).append(row)
            print(json.dumps(row), flush=True)
    for name, rs in rows.items():
        ns = [r["n"] for r in rs]
        growth = {"growth": name, "n_ratio": ns[-1] / ns[0],
                  "time_ratio": round(rs[-1]["seconds"] / rs[0]["seconds"], 2),
                  "memory_ratio": round(rs[-1]["saved_mib"] / rs[0]["saved_mib"], 2),
                  "time_exponent": round(slope(ns, [r["seconds"] for r in rs]), 2),
                  "memory_exponent": round(slope(ns, [r["saved_mib"] for r in rs]), 2)}
        if "full" in rows and name != "full":  # the same length, the same run: how much cheaper than full
            growth["time_vs_full_at_max_n"] = round(rs[-1]["seconds"] / rows["full"][-1]["seconds"], 3)
        print(json.dumps(growth), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
