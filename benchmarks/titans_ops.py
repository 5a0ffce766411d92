"""Launches per training step, measured: aten ops dispatched in one MAC / MAG forward + backward.

    python benchmarks/titans_ops.py                                   # fused torch path (CPU), T = 1k, 4k, 16k
    python benchmarks/titans_ops.py --lengths 1024,4096 --chunk-sizes 16,64 --models mac
    python benchmarks/titans_ops.py --triton                          # Triton path under TRITON_INTERPRET=1

One JSON line per (model, path, b, T): every aten op the step dispatches (forward + loss.backward(), counted with a
TorchDispatchMode; non-view ops are
roughly the kernel launches a GPU would see: views, detach and empty allocations launch nothing), the ops dispatched inside the deep-memory op's
forward, the number of memory calls (MAC: one per segment and layer; MAG: one per layer) and, on the Triton path,
the Triton kernel launches (memtrain/kernels/titans/triton_deep.py counts them). The fused torch path runs a Python
loop over the T / b chunks, so its count grows linearly with T / b; the Triton path's count per memory call must
not (docs/titans_kernels.md#launches-per-training-step). Tiny width: this measures op counts, not speed.
The Triton path runs interpreted on CPU (slow), so --triton defaults to short sequences; the counts it reports
are what a CUDA run launches (the kernels and the torch ops around them are the same).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_METADATA = {torch.ops.aten.detach, torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
             torch.ops.aten.lift_fresh}


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward and, for CPU tensors, the backward too: the autograd
    engine runs CPU graphs on the calling thread, and dispatch modes propagate to its workers)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0   # view / metadata ops (no kernel of their own on a GPU)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        self.views += bool(func.is_view) or func.overloadpacket in _METADATA
        return func(*args, **(kwargs or {}))


class _Uncounted:
    """Wraps a Triton kernel so that launching it dispatches nothing into the counter: under TRITON_INTERPRET=1
    the interpreter copies every argument with aten ops (set_, empty, copy_) that a compiled launch does not do."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            with _disable_current_modes():
                return launch(*args, **kw)
        return run


def build(kind: str, a: argparse.Namespace, T: int, b: int):
    sys.path.insert(0, ROOT)
    from memtrain.model import ModelConfig, build_model
    from memtrain.model.memory.titans.config import TitansConfig
    cfg = ModelConfig(vocab_size=256, d_model=a.dim, n_layers=a.layers, n_heads=2, max_seq_len=max(T, 1024),
                      num_meta_tokens=4, window=a.window, memory=kind,
                      titans=TitansConfig(segment_len=a.segment_len, chunk_size=b, memory_depth=a.mem_depth,
                                          memory_heads=2, memory_expansion=2.0))
    torch.manual_seed(0)
    return build_model(cfg)


def measure(kind: str, a: argparse.Namespace, T: int, b: int, path: str) -> dict:
    import memtrain.kernels.titans as titans
    model = build(kind, a, T, b)
    if path == "triton":
        # the model config refuses memory_backend="triton" for depth > 1 (memtrain/model/memory/titans/config.py
        # predates the deep kernel), so the memory modules' backend attribute is switched after construction
        n = 0
        for m in model.modules():
            if hasattr(m, "backend") and hasattr(m, "chunk_size"):
                m.backend, n = "triton", n + 1
        assert n, "no memory module found"
    calls, mem_fwd_ops = [0], [0]
    inner = titans.deep_memory
    counter = OpCounter()

    def counted(*args, **kw):   # the model imports deep_memory at call time (memtrain/model/factory.py)
        calls[0] += 1
        before = sum(counter.ops.values())
        out = inner(*args, **kw)
        mem_fwd_ops[0] += sum(counter.ops.values()) - before
        return out

    tokens = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()      # warm-up (lazy initialisation not counted)
    model.zero_grad(set_to_none=True)
    launches0 = None
    if path == "triton":
        from memtrain.kernels.titans import triton_deep, triton_deep_bwd
        launches0 = dict(triton_deep.LAUNCHES)
        if not isinstance(triton_deep._fwd_kernel, _Uncounted):
            triton_deep._fwd_kernel = _Uncounted(triton_deep._fwd_kernel)
            triton_deep_bwd.bwd_kernel = _Uncounted(triton_deep_bwd.bwd_kernel)
    titans.deep_memory = counted
    try:
        with counter:
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    finally:
        titans.deep_memory = inner
    total = sum(counter.ops.values())
    row = dict(model=kind, path=path, T=T, b=b, T_over_b=T // b, segment_len=a.segment_len if kind == "mac" else None,
               memory_calls=calls[0], aten_ops=total, non_view_ops=total - counter.views, memory_forward_aten_ops=mem_fwd_ops[0],
               aten_ops_per_memory_call=round(total / max(calls[0], 1), 1),
               top_ops=dict(counter.ops.most_common(5)))
    if launches0 is not None:
        from memtrain.kernels.titans import triton_deep
        row["triton_launches"] = {k: triton_deep.LAUNCHES[k] - launches0[k] for k in launches0}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mac,mag")
    p.add_argument("--lengths", default=None, help="default 1024,4096,16384 (fused), 64,128,256,512 (--triton)")
    p.add_argument("--chunk-sizes", default="16,64")
    p.add_argument("--triton", action="store_true", help="the Triton path, in a TRITON_INTERPRET=1 subprocess")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--mem-depth", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.triton and not a.child:   # Triton reads TRITON_INTERPRET when the kernels are decorated: a fresh process
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child"], env=env)
    torch.set_num_threads(1)
    lengths = a.lengths or ("64,128,256,512" if a.triton else "1024,4096,16384")
    for kind in a.models.split(","):
        for b in (int(x) for x in a.chunk_sizes.split(",")):
            for T in (int(x) for x in lengths.split(",")):
                print(json.dumps(measure(kind, a, T, b, "triton" if a.triton else "fused")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
