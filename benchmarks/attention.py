"""Time and peak memory of the prefix-attention backends against SDPA with a dense mask.

    python benchmarks/attention.py                     # N = 1k..16k, window 256, P = 32, B=1, H=8, D=64, fp32
    python benchmarks/attention.py --quick             # N = 1k, 2k, 4k, fewer repeats
    python benchmarks/attention.py --n 8192 --backends dense sdpa

Prints one JSON line per measurement (docs/architecture.md#measuring): backend, N, mode ("fwd" or "fwd_bwd"), median time, peak
memory, and ratios against the dense baseline measured in the same run (speedup = t_dense / t_backend,
mem_ratio = mem_backend / mem_dense). A final "summary" line gives, per backend and mode, how peak memory grows
from one N to the next (2.0 per doubling of N = linear).

Method. Every (backend, N) runs in a fresh subprocess, so one measurement cannot inherit another's heap or
compiled code. Peak memory = peak RSS during one call minus RSS just before it, the call made after a warm-up
call (so flex's compilation is not counted): the peak is reset with ``echo 5 > /proc/self/clear_refs`` and read
as VmHWM from /proc/self/status (where clear_refs is refused: ru_maxrss delta over the warm-up call, which then
includes one-time costs; the JSON says which). The child runs with MALLOC_MMAP_THRESHOLD_=65536 so freed large
buffers go back to the OS instead of staying in the heap, where the measured call would reuse them unseen. Time
= median over --repeats calls after the warm-up (the memory call is one of them; a call slower than 3 s is timed
once). "auto" reports the backend it resolved to per mode (on CPU: flex for the windowed forward at N >= 4096,
sdpa when a gradient is needed). The dense baseline's N x N boolean mask is built once before the measurement (as a model would cache it): its size is
reported as ``dense_mask_mb`` and is not in its peak. The baseline is skipped where its estimated footprint
exceeds --max-dense-gb (default 8; the estimate is the mask and its fp32 copy, 5 bytes * N^2).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ALL_BACKENDS = ("dense", "auto", "sdpa", "flex", "reference", "flash")
DEFAULT_BACKENDS = ("dense", "auto", "sdpa", "flex")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(args) -> dict:
    """Measure one backend at one N in this process; returns a dict for the parent."""
    import torch
    import torch.nn.functional as F

    from memtrain.kernels.attention import attention, build_mask, select_backend

    torch.manual_seed(0)
    n, P, W = args.child_n, args.prefix, args.window
    shape_q, shape_kv = (args.batch, args.heads, n, args.dim), (args.batch, args.kv_heads, n, args.dim)
    q, k, v = torch.randn(shape_q), torch.randn(shape_kv), torch.randn(shape_kv)
    dout = torch.randn(shape_q)
    name = args.child_backend
    info = {}
    if name == "dense":
        mask = build_mask(n, P, W)
        info["dense_mask_mb"] = mask.numel() / 2**20
        gqa = args.heads != args.kv_heads
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # noqa: E731
    else:
        fn = lambda q, k, v: attention(q, k, v, num_prefix=P, window=W, backend=name)  # noqa: E731

    modes = ["fwd"] if args.no_backward or (name == "flex" and q.device.type == "cpu") else ["fwd", "fwd_bwd"]
    results = {}
    for mode in modes:
        grad = mode == "fwd_bwd"
        for x in (q, k, v):
            x.requires_grad_(grad)
            x.grad = None
        with torch.set_grad_enabled(grad):  # what "auto" runs depends on whether a gradient is needed
            resolved = select_backend(q, k, v, W, P) if name == "auto" else name

        def call():
            if grad:
                fn(q, k, v).backward(dout)
                for x in (q, k, v):
                    x.grad = None
            else:
                with torch.no_grad():
                    fn(q, k, v)

        gc.collect()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        call()  # warm-up: compiles flex, faults in the allocator
        warm_s = time.perf_counter() - t0
        warm_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
        gc.collect()
        times = []
        if _reset_peak():
            rss0 = _status_kb("VmRSS")
            t0 = time.perf_counter()
            call()  # the memory call is also the first timed sample
            times.append(time.perf_counter() - t0)
            peak_kb, method = _status_kb("VmHWM") - rss0, "VmHWM-after-clear_refs"
        else:
            peak_kb, method = warm_peak_kb, "ru_maxrss-delta-first-call"
        # Slow calls (the dense baseline at large N) get fewer samples to keep the run within minutes.
        slow = (times[0] if times else warm_s) > 3  # judged after warm-up, so flex's compile does not count
        for _ in range(max((1 if slow else args.repeats) - len(times), 0)):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        results[mode] = {
            "resolved": resolved, "time_s": statistics.median(times), "time_min_s": min(times), "repeats": len(times),
            "first_call_s": warm_s, "peak_mem_mb": max(peak_kb, 0) / 1024, "mem_method": method,
        }
    info["threads"] = torch.get_num_threads()
    info["results"] = results
    return info


def _dense_estimate_gb(a, backend, n) -> float:
    # dense: the bool mask + the additive fp32 copy SDPA makes of it (the fused CPU kernel keeps no score matrix;
    # measured peaks follow 4 bytes * N^2). reference: ~4 fp32 score-sized tensors per head in forward+backward.
    if backend == "reference":
        return (n * n + 4 * a.batch * a.heads * n * n * 4) / 2**30
    return n * n * 5 / 2**30


def _run_child(a, backend, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--child-backend", backend, "--child-n", str(n),
           "--window", str(a.window), "--prefix", str(a.prefix), "--batch", str(a.batch), "--heads", str(a.heads),
           "--kv-heads", str(a.kv_heads), "--dim", str(a.dim), "--repeats", str(a.repeats)]
    if a.no_backward:
        cmd.append("--no-backward")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.child_timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths (incl. prefix)")
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=ALL_BACKENDS)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="N = 1k, 2k, 4k and 2 repeats unless given")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--max-dense-gb", type=float, default=8.0, help="skip the dense baseline above this estimate")
    p.add_argument("--child-timeout", type=float, default=600)
    p.add_argument("--child-backend", help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeats is None:
        a.repeats = 2 if a.quick else 3
    if a.child_backend:
        print(json.dumps(_child(a)))
        return
    ns = a.n or ([1024, 2048, 4096] if a.quick else [1024, 2048, 4096, 8192, 16384])
    backends = ["dense"] + [b for b in a.backends if b != "dense"] if "dense" in a.backends else a.backends
    common = {"bench": "attention", "window": a.window, "prefix": a.prefix, "batch": a.batch, "heads": a.heads,
              "kv_heads": a.kv_heads, "dim": a.dim, "dtype": "float32", "device": "cpu"}
    table = {}
    for n in ns:
        base = {}
        for backend in backends:
            row = dict(common, backend=backend, n=n)
            if backend in ("dense", "reference") and _dense_estimate_gb(a, backend, n) > a.max_dense_gb:
                row["skipped"] = (f"estimated {_dense_estimate_gb(a, backend, n):.1f} GB > --max-dense-gb "
                                  f"{a.max_dense_gb:g}: dense N x N baseline not run")
                print(json.dumps(row), flush=True)
                continue
            info = _run_child(a, backend, n)
            if "error" in info:
                print(json.dumps(dict(row, error=info["error"])), flush=True)
                continue
            for mode, r in info["results"].items():
                out = dict(row, mode=mode, threads=info["threads"], **r)
                if "dense_mask_mb" in info:
                    out["dense_mask_mb"] = info["dense_mask_mb"]
                if backend == "dense":
                    base[mode] = r
                elif mode in base:
                    out["speedup_vs_dense"] = base[mode]["time_s"] / r["time_s"]
                    out["mem_ratio_vs_dense"] = r["peak_mem_mb"] / max(base[mode]["peak_mem_mb"], 1e-9)
                else:
                    out["speedup_vs_dense"] = None  # baseline skipped or failed at this N
                table.setdefault((backend, mode), []).append((n, r["peak_mem_mb"]))
                print(json.dumps(out), flush=True)
    growth = {f"{b}/{m}": [round(m2 / max(m1, 1e-9), 2) for (_, m1), (_, m2) in zip(v, v[1:])]
              for (b, m), v in table.items()}
    print(json.dumps({"bench": "attention", "summary": "peak memory growth factor between consecutive N "
                      "(2.0 per doubling = linear)", "n": ns, "growth": growth}), flush=True)


if __name__ == "__main__":
    main()
