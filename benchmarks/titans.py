"""Titans memory kernel benchmark: one JSON line per measurement, ratios taken within the same run.

    python benchmarks/titans.py                 # all kernel measurements (CPU: a few minutes)
    python benchmarks/titans.py --only speed    # fast path vs per-token loop only
    python benchmarks/titans.py --only memory   # peak memory vs T only

1. speed: forward + backward of the linear memory, B=1, H=4, T=4096, Dk=Dv=64, fp32. The fast path ("auto":
   chunked torch on CPU, Triton on CUDA) against the per-token spec loops of memtrain/kernels/titans/reference.py:
   the naive chunk loop at the same chunk size (identical outputs) and the b = 1 recurrence. Also the deep (MLP)
   memory: the fused loop (hand-written backward, the default) against autograd through the chunked dual form
   and the naive loop (shorter T: the spec takes per-token autograd gradients), at --deep-chunk-sizes.
2. memory: peak memory of the chunked op (forward + backward) for T = 1k .. 32k. On CPU each T runs in a fresh
   subprocess and reports peak RSS growth during the op (VmHWM after, reset via /proc/self/clear_refs, minus
   VmRSS before); on CUDA
   torch.cuda.max_memory_allocated. Linear growth <=> bytes/token roughly constant.
(The MAC-vs-titans-pytorch training-step comparison is benchmarks/titans_model.py.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from memtrain.kernels.titans import deep_memory, linear_memory  # noqa: E402
from memtrain.kernels.titans.reference import (deep_memory_naive_chunks, linear_memory_naive_chunks,  # noqa: E402
                                      linear_memory_recurrent)
from memtrain.kernels.titans.testing import make_deep_state, make_inputs, make_linear_state  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, inputs, state, repeats, device):
    """Best-of-``repeats`` seconds of fn forward + backward (sum of all outputs as the loss)."""
    best = float("inf")
    for _ in range(repeats):
        ins = [x.detach().clone().requires_grad_(True) for x in inputs]
        st = [s.detach().clone().requires_grad_(True) for s in state]
        _sync(device)
        t0 = time.perf_counter()
        y, (W, S, _) = fn(ins, st)
        (y.sum() + W.sum() + S.sum()).backward()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_speed(device, chunk_size, T=4096, H=4, D=64, ref_repeats=1, fast_repeats=5):
    dt = torch.float32
    inputs = make_inputs(1, H, T, D, D, dtype=dt, device=device, seed=0, theta_max=0.2)
    state = make_linear_state(1, H, D, D, dtype=dt, device=device)
    cfg = dict(B=1, H=H, T=T, Dk=D, Dv=D, dtype="float32", device=device, chunk_size=chunk_size,
               threads=torch.get_num_threads(), pass_="forward+backward")
    fast = lambda i, s: linear_memory(*i, chunk_size=chunk_size, state=tuple(s), backend="auto")  # noqa: E731
    naive = lambda i, s: linear_memory_naive_chunks(*i, chunk_size=chunk_size, state=tuple(s))  # noqa: E731
    recur = lambda i, s: linear_memory_recurrent(*i, tuple(s))  # noqa: E731
    fast(inputs, state)                                                       # warm-up (Triton compile)
    t_fast = time_fwd_bwd(fast, inputs, state, fast_repeats, device)
    t_naive = time_fwd_bwd(naive, inputs, state, ref_repeats, device)
    t_recur = time_fwd_bwd(recur, inputs, state, ref_repeats, device)
    backend = "chunked" if device == "cuda" else "fused"   # what backend="auto" picks
    emit(bench="linear_memory_speed", **cfg, fast_backend=backend, fast_s=round(t_fast, 5),
         naive_chunk_loop_s=round(t_naive, 4), per_token_recurrence_s=round(t_recur, 4),
         speedup_vs_naive_chunk_loop=round(t_naive / t_fast, 1),
         speedup_vs_per_token_recurrence=round(t_recur / t_fast, 1),
         fast_tokens_per_s=round(T / t_fast))


def bench_deep_speed(device, chunk_size, T=1024, H=4, D=64, depth=2, expansion=2.0):
    dt = torch.float32
    q, k, v, th, et, al = make_inputs(1, H, T, D, D, dtype=dt, device=device, seed=0, theta_max=0.05, eta_max=0.9,
                                      alpha_max=0.1)
    ws, ss = make_deep_state(1, H, D, D, depth=depth, expansion=expansion, dtype=dt, device=device)

    def run(fn):
        ins = [x.clone().requires_grad_(True) for x in (q, k, v, th, et, al)]
        st = (tuple(w.clone().requires_grad_(True) for w in ws), tuple(s.clone().requires_grad_(True) for s in ss))
        _sync(device)
        t0 = time.perf_counter()
        y, (W, S, _) = fn(ins, st)
        (y.sum() + sum(w.sum() for w in W)).backward()
        _sync(device)
        return time.perf_counter() - t0

    fast = lambda i, s: deep_memory(*i, chunk_size=chunk_size, state=s, backend="fused")  # noqa: E731
    chunked = lambda i, s: deep_memory(*i, chunk_size=chunk_size, state=s, backend="chunked")  # noqa: E731
    naive = lambda i, s: deep_memory_naive_chunks(*i, s, chunk_size=chunk_size)  # noqa: E731
    run(fast), run(chunked)
    t_fast, t_chunked = float("inf"), float("inf")
    for _ in range(5):  # alternating, best of 5 each: load drifts hit both
        t_fast, t_chunked = min(t_fast, run(fast)), min(t_chunked, run(chunked))
    t_naive = run(naive)
    emit(bench="deep_memory_speed", B=1, H=H, T=T, Dk=D, Dv=D, depth=depth, expansion=expansion, act="gelu",
         dtype="float32", device=device, chunk_size=chunk_size, pass_="forward+backward",
         fast_backend="fused (auto)", fast_s=round(t_fast, 4), chunked_autograd_s=round(t_chunked, 4),
         naive_chunk_loop_s=round(t_naive, 4), speedup_vs_chunked_autograd=round(t_chunked / t_fast, 2),
         speedup_vs_naive_chunk_loop=round(t_naive / t_fast, 1))


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(T, H, D, chunk_size, device):
    """Runs in a fresh process: peak memory of one forward + backward of the linear memory (backend="auto": fused on
    CPU, chunked on CUDA) at length T."""
    dt = torch.float32
    inputs = [x.requires_grad_(True) for x in make_inputs(1, H, T, D, D, dtype=dt, device=device, theta_max=0.2)]
    state = [s.requires_grad_(True) for s in make_linear_state(1, H, D, D, dtype=dt, device=device)]
    # warm-up at a tiny length so allocator/library set-up is not counted
    small = [x[:, :, :chunk_size].detach().requires_grad_(True) for x in inputs]
    y, (W, S, _) = linear_memory(*small, chunk_size=chunk_size, state=tuple(state), backend="auto")
    (y.sum() + W.sum()).backward()
    del y, W, S
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    y, (W, S, _) = linear_memory(*inputs, chunk_size=chunk_size, state=tuple(state), backend="auto")
    (y.sum() + W.sum() + S.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    inout = sum(x.numel() * x.element_size() * 2 for x in inputs)            # inputs + their gradients
    print(json.dumps(dict(peak_bytes=peak, inputs_and_grads_bytes=inout)))


def bench_memory(device, chunk_size, H=4, D=64, lengths=(1024, 2048, 4096, 8192, 16384, 32768)):
    prev = None
    for T in lengths:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(T), "--device", device,
               "--chunk-size", str(chunk_size)]
        # glibc: serve every allocation >= 64 KiB by mmap so a free returns it at once and RSS tracks live memory
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak = r["peak_bytes"]
        emit(bench="linear_memory_peak_memory", B=1, H=H, T=T, Dk=D, Dv=D, dtype="float32", device=device,
             chunk_size=chunk_size, pass_="forward+backward",
             measure="cuda max_memory_allocated" if device == "cuda" else "peak RSS growth during the op",
             peak_mib=round(peak / 2**20, 2), bytes_per_token=round(peak / T),
             inputs_and_grads_mib=round(r["inputs_and_grads_bytes"] / 2**20, 2),
             growth_vs_previous_T=None if prev is None else round(peak / prev, 2))
        prev = peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--deep-chunk-sizes", default=None,
                    help="comma-separated chunk sizes for the deep-memory part (default: --chunk-size)")
    ap.add_argument("--only", choices=["speed", "deep", "memory"], default=None)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, 4, 64, args.chunk_size, args.device)
        return
    if args.only in (None, "speed"):
        bench_speed(args.device, args.chunk_size)
    if args.only in (None, "deep"):
        for b in (args.deep_chunk_sizes or str(args.chunk_size)).split(","):
            bench_deep_speed(args.device, int(b))
    if args.only in (None, "memory"):
        bench_memory(args.device, args.chunk_size)


if __name__ == "__main__":
    main()
