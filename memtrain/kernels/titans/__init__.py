"""Titans neural long-term memory kernels (docs/titans_kernels.md#the-memory-exactly).

Public ops (fla house style: :mod:`.reference` is the spec, fast paths must match it in fp64):

    y, state = linear_memory(q, k, v, theta, eta, alpha, *, chunk_size, state=None, chunk_offset=0,
                             backend="auto")
    y, state = deep_memory(q, k, v, theta, eta, alpha, *, chunk_size, state, chunk_offset=0, act="gelu",
                           backend="auto")

Shapes: q, k [B,H,T,Dk]; v [B,H,T,Dv]; theta, eta, alpha [B,H,T] in [0, 1]; y [B,H,T,Dv].
Linear state: (W, S) or (W, S, W_anchor), each [B,H,Dv,Dk] (zeros when None).
Deep state:   (weights, momenta) or (weights, momenta, anchor weights); weights[l] [B,H,d_l,d_{l-1}]
              (d_0 = Dk, d_L = Dv; momenta None -> zeros). :func:`init_deep_memory` makes per-head weights.
Both return the 3-tuple state (memory, momentum, anchor); the anchor is the memory at the start of the chunk the
next token falls into. Pass it back, with ``chunk_offset = tokens_seen % chunk_size``, to continue a sequence
exactly (one pass == chained passes, also when pieces end mid-chunk). With chunk_offset == 0 a 2-tuple suffices.
The initial state is differentiable (learned M_0 expanded over the batch).

Backends: "chunked" (chunk-parallel torch, any device; autograd gives the backward), "fused" (the chunk loop as one
autograd Function with a hand-written backward, :mod:`.deep_fused`; the linear memory runs as its one-layer case),
"triton" (CUDA, or CPU under TRITON_INTERPRET=1; linear: :mod:`.triton_linear`, forward + backward kernels; deep,
depth 2/3: :mod:`.triton_deep` / :mod:`.triton_deep_bwd`, forward + backward kernels), "reference" (naive chunk
loop). "auto": linear memory fused on CPU (3x faster than chunked at the models' sizes:
docs/titans_kernels.md#linear-memory-on-cpu) and chunked on CUDA, until the Triton kernel has passed its GPU parity
tests (tests/kernels/test_titans_triton.py, marked gpu) and a benchmark on a GPU; deep memory Triton on CUDA (depth
2/3, where its on-chip state fits the device), fused elsewhere (docs/titans_kernels.md#triton-deep-memory-kernel).

Precision: bf16/fp16 inputs are computed in fp32 (the gate products, b×b carry matrices and the carried
state lose most of their digits in bf16: 7e-2 relative error at T = 256), y is returned in the input
dtype and the state stays fp32 across calls.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .chunked import deep_memory_chunked, linear_memory_chunked
from .deep_fused import deep_memory_fused, linear_memory_fused
from .reference import deep_memory_naive_chunks, linear_memory_naive_chunks

__all__ = ["linear_memory", "deep_memory", "init_deep_memory"]


def _check(q, k, v, theta, eta, alpha, chunk_size, chunk_offset):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k [B,H,T,Dk] and v [B,H,T,Dv] expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B,H,T] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    if int(chunk_size) < 1 or not 0 <= int(chunk_offset) < int(chunk_size):
        raise ValueError(f"need chunk_size >= 1 and 0 <= chunk_offset < chunk_size, got {chunk_size}, "
                         f"{chunk_offset}")


def _compute_precision(q, k, v, theta, eta, alpha, state):
    """Inputs (and the state, nested tuples of tensors) in fp32 when q is bf16/fp16; fp32/fp64 unchanged."""
    if q.dtype in (torch.float32, torch.float64):
        return q, k, v, theta, eta, alpha, state

    def up(x):
        if x is None:
            return None
        if isinstance(x, (tuple, list)):
            return type(x)(up(t) for t in x)
        return x.float()

    return (*(t.float() for t in (q, k, v, theta, eta, alpha)), up(state))


def _triton_usable(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return True
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def linear_memory(q, k, v, theta, eta, alpha, *, chunk_size: int, state=None, chunk_offset: int = 0,
                  backend: str = "auto"):
    """Linear Titans memory M(x) = W x. Shapes in the module docstring. Returns (y, (W, S, W_anchor))."""
    _check(q, k, v, theta, eta, alpha, chunk_size, chunk_offset)
    out_dtype = q.dtype
    q, k, v, theta, eta, alpha, state = _compute_precision(q, k, v, theta, eta, alpha, state)
    if backend == "auto":
        backend = "chunked" if q.is_cuda else "fused"
    kw = dict(chunk_size=chunk_size, state=state, chunk_offset=chunk_offset)
    if backend == "fused":
        y, state = linear_memory_fused(q, k, v, theta, eta, alpha, **kw)
        return y.to(out_dtype), state
    if backend == "chunked":
        y, state = linear_memory_chunked(q, k, v, theta, eta, alpha, **kw)
        return y.to(out_dtype), state
    if backend == "triton":
        if not _triton_usable(q):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        from .triton_linear import linear_memory_triton   # imported lazily: TRITON_INTERPRET is read at import
        y, state = linear_memory_triton(q, k, v, theta, eta, alpha, **kw)
        return y.to(out_dtype), state
    if backend == "reference":
        y, state = linear_memory_naive_chunks(q, k, v, theta, eta, alpha, **kw)
        return y.to(out_dtype), state
    raise ValueError(f"unknown backend {backend!r}")


def _deep_triton_shape(state) -> bool:
    """Whether the Triton deep kernel takes this memory: depth 2 or 3 with a square middle layer."""
    ws = state[0]
    return len(ws) in (2, 3) and (len(ws) == 2 or ws[1].shape[-1] == ws[1].shape[-2])


def _deep_triton_fits(q, v, state, chunk_size, act) -> bool:
    """backend="auto" on CUDA: the Triton deep kernel if it takes the shape and its on-chip state fits the device's
    shared memory (checked once per shape by compiling). Any failure of that check means the fused path: the
    kernel has not yet run on a GPU (docs/titans_kernels.md#triton-deep-memory-kernel), so auto must not break."""
    ws = state[0]
    if not _deep_triton_shape(state) or act not in ("gelu", "silu"):
        return False
    key = (len(ws), act, int(chunk_size), q.shape[-1], ws[0].shape[-2], v.shape[-1], q.dtype, q.device)
    if key not in _DEEP_TRITON_FITS:
        try:
            from .triton_deep import fits_on_device
            _DEEP_TRITON_FITS[key] = fits_on_device(*key)
        except Exception as e:  # noqa: BLE001  (compile errors of an unverified kernel: fall back, say why)
            warnings.warn(f"deep memory: Triton kernel unavailable for {key[:6]}, using the fused path: {e}")
            _DEEP_TRITON_FITS[key] = False
    return _DEEP_TRITON_FITS[key]


_DEEP_TRITON_FITS: dict = {}


def deep_memory(q, k, v, theta, eta, alpha, *, chunk_size: int, state, chunk_offset: int = 0, act: str = "gelu",
                backend: str = "auto"):
    """Deep (MLP) Titans memory; plain MLP W_L act(... act(W_1 x)). Returns (y, (weights, momenta, anchor))."""
    _check(q, k, v, theta, eta, alpha, chunk_size, chunk_offset)
    out_dtype = q.dtype
    q, k, v, theta, eta, alpha, state = _compute_precision(q, k, v, theta, eta, alpha, state)
    if backend == "auto":   # Triton on CUDA for the shapes its kernel takes; everywhere else the fused torch loop
        backend = "triton" if q.is_cuda and _deep_triton_fits(q, v, state, chunk_size, act) else "fused"
    if backend == "triton":
        if not _triton_usable(q):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        from .triton_deep import deep_memory_triton   # imported lazily: TRITON_INTERPRET is read at import
        y, state = deep_memory_triton(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size,
                                      chunk_offset=chunk_offset, act=act)
        return y.to(out_dtype), state
    if backend == "fused":
        y, state = deep_memory_fused(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size,
                                     chunk_offset=chunk_offset, act=act)
        return y.to(out_dtype), state
    if backend == "chunked":
        y, state = deep_memory_chunked(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size,
                                       chunk_offset=chunk_offset, act=act)
        return y.to(out_dtype), state
    if backend == "reference":
        y, state = deep_memory_naive_chunks(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size,
                                            chunk_offset=chunk_offset, act=act)
        return y.to(out_dtype), state
    raise ValueError(f"unknown backend {backend!r}")


def init_deep_memory(heads: int, dim_k: int, dim_v: int, *, depth: int = 2, expansion: float = 4.0,
                     dtype: torch.dtype = torch.float32, device=None,
                     generator: Optional[torch.Generator] = None) -> tuple:
    """Per-head initial weights of the deep memory: a tuple of ``depth`` tensors [H, d_l, d_{l-1}].

    Hidden width = round(expansion * dim_k). Normal init with std 1/sqrt(fan_in). Make them nn.Parameters and
    expand over the batch (``w.expand(B, *w.shape)``) to get a learned, differentiable M_0.
    """
    if depth < 1:
        raise ValueError("depth must be >= 1")
    hidden = max(1, int(round(expansion * dim_k)))
    dims = [dim_k] + [hidden] * (depth - 1) + [dim_v]
    return tuple(torch.randn(heads, dims[i + 1], dims[i], dtype=dtype, device=device, generator=generator)
                 / math.sqrt(dims[i]) for i in range(depth))
