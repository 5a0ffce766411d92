"""Titans memory across context-parallel ranks: each rank holds a contiguous slice of the tokens (docs/titans_kernels.md#the-memory-exactly; docs/distributed.md).

Linear memory (exact, no rank waits for another's compute): the update of a slice is affine in the incoming
state X = [W | S | W_anchor] (`[B, H, Dv, n·Dk]`, n = 2 when every slice starts on a chunk boundary, else 3):

    X_out = X · F_lin + F_const        y_t = y_const,t + X · yb_t

with F_lin `[n·Dk, n·Dk]`, F_const `[Dv, n·Dk]`, yb_t `[n·Dk]`, and the rows of W (one per value dimension)
evolving independently. One call of the public `linear_memory` op over the slice gives all of them: its values
are v padded with n·Dk zero columns and its state has, in those extra rows, the identity basis of W, S and
W_anchor (zeros in the first Dv rows). The first Dv rows of its result are the slice's evolution from a zero
state (F_const, y_const), the extra rows the images of the basis (F_lin, yb). Every rank all-gathers
F = [F_const; F_lin] `[B, H, Dv + n·Dk, n·Dk]`, composes the maps of the ranks before it onto the initial
state, and reads its outputs off yb: no second pass. Autograd runs through all of it (the all-gather's backward
sums the gradients over ranks), so gradients are exact. Cost: the memory op runs with Dv + n·Dk value columns
instead of Dv, plus r small `[Dv, n·Dk] × [n·Dk, n·Dk]` products on rank r.

Deep memory is not affine: `deep_memory_context_parallel` passes the state rank to rank (the hand-off of
`memtrain.launch.context_parallel.ContextParallel`), so ranks run their slices one after another.

Communication is injected (`all_gather`, `sequence`), so this file names no process group.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import deep_memory, linear_memory

__all__ = ["linear_memory_context_parallel", "deep_memory_context_parallel", "slice_offsets"]


def slice_offsets(local_len: int, size: int, chunk_size: int, chunk_offset: int = 0) -> list[int]:
    """Chunk offset at which each rank's slice starts, for a sequence starting `chunk_offset` into a chunk."""
    return [(chunk_offset + r * local_len) % chunk_size for r in range(size)]


def _full_linear_state(state, q, v, chunk_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, _, Dk = q.shape
    if state is None:
        W = q.new_zeros(B, H, v.shape[-1], Dk)
        return W, torch.zeros_like(W), W
    if len(state) == 2:
        if chunk_offset:
            raise ValueError("chunk_offset > 0 needs the anchor memory: pass state = (W, S, W_anchor)")
        return state[0], state[1], state[0]
    return tuple(state)


def linear_memory_context_parallel(q, k, v, theta, eta, alpha, *, chunk_size: int, state=None, chunk_offset: int = 0,
                                   rank: int, size: int, all_gather: Callable[[torch.Tensor], torch.Tensor],
                                   backend: str = "auto"):
    """This rank's slice of `memtrain.kernels.titans.linear_memory` over a sequence split into `size` equal slices.

    q, k `[B, H, T_l, Dk]`, v `[B, H, T_l, Dv]`, gates `[B, H, T_l]`: slice `rank` of the sequence. `state`: the
    initial state of the whole sequence (None, (W, S) or (W, S, W_anchor), each `[B, H, Dv, Dk]`; the same on
    every rank), `chunk_offset`: where the sequence starts within a chunk. `all_gather(x)` -> `[size, *x.shape]`
    must be differentiable (backward: sum over ranks, this rank's part). Returns (y `[B, H, T_l, Dv]`, state at
    the end of this slice (W, S, W_anchor)); on the last rank that is the sequence's final state.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype = q.dtype
    if q.dtype not in (torch.float32, torch.float64):  # the maps are composed in fp32 at least (bf16 loses digits)
        q, k, v, theta, eta, alpha = (t.float() for t in (q, k, v, theta, eta, alpha))
        state = None if state is None else tuple(s.float() for s in state)
    offsets = slice_offsets(T, size, chunk_size, chunk_offset)
    n = 2 if not any(offsets) else 3  # all slices start on chunk boundaries: the anchor is W, no third block
    X = torch.cat(_full_linear_state(state, q, v, chunk_offset % chunk_size)[:n], dim=-1)  # [B, H, Dv, n·Dk]

    # The basis state: rows Dv + i·Dk + m hold e_m in block i (W, S, W_anchor); the first Dv rows are zero.
    eye = torch.eye(n * Dk, dtype=q.dtype, device=q.device)
    basis = [torch.cat([q.new_zeros(Dv, Dk), eye[:, i * Dk:(i + 1) * Dk]]).expand(B, H, Dv + n * Dk, Dk)
             for i in range(n)]
    basis_state = tuple(basis)  # n = 2: (W, S) with the anchor = W (every slice starts a chunk)
    v_ext = torch.cat([v, v.new_zeros(B, H, T, n * Dk)], dim=-1)
    y_ext, out = linear_memory(q, k, v_ext, theta, eta, alpha, chunk_size=chunk_size, state=basis_state,
                               chunk_offset=offsets[rank], backend=backend)
    F = torch.cat(out[:n], dim=-1)  # [B, H, Dv + n·Dk, n·Dk]: F_const rows, then F_lin rows

    maps = all_gather(F)  # [size, B, H, Dv + n·Dk, n·Dk]
    # The gather's backward is a collective, so it must be in every rank's graph, rank 0's too (an exact zero).
    X = X + maps[:rank].sum(0)[..., :Dv, :] if rank == 0 else X
    for j in range(rank):  # compose the earlier slices' maps onto the initial state
        X = maps[j][..., :Dv, :] + X @ maps[j][..., Dv:, :]
    y = y_ext[..., :Dv] + y_ext[..., Dv:] @ X.transpose(-1, -2)  # [B, H, T_l, Dv]
    X_out = F[..., :Dv, :] + X @ F[..., Dv:, :]
    W, S, *rest = X_out.split(Dk, dim=-1)
    return y.to(out_dtype), (W, S, rest[0] if rest else W)


def _full_deep_state(state, chunk_offset: int):
    weights = tuple(state[0])
    momenta = tuple(state[1]) if state[1] is not None else tuple(torch.zeros_like(w) for w in weights)
    if len(state) == 2 and chunk_offset:
        raise ValueError("chunk_offset > 0 needs the anchor weights: pass state = (Ws, Ss, Ws_anchor)")
    anchor = tuple(state[2]) if len(state) > 2 else weights
    return weights, momenta, anchor


def deep_memory_context_parallel(q, k, v, theta, eta, alpha, *, chunk_size: int, state, sequence,
                                 chunk_offset: int = 0, act: str = "gelu", backend: str = "auto"):
    """This rank's slice of `memtrain.kernels.titans.deep_memory`: the state is handed rank to rank.

    Shapes as `deep_memory` for the slice; `state` is the sequence's initial state (weights, momenta[, anchor])
    on every rank (only rank 0 uses it), `sequence` a `ContextParallel` (its `handoff_in` / `handoff_out`).
    Rank r waits for rank r − 1's final state; the backward passes the state's gradient back the same way.
    Returns (y `[B, H, T_l, Dv]`, state at the end of this slice (weights, momenta, anchor)).
    """
    T = q.shape[2]
    full = _full_deep_state(state, chunk_offset % chunk_size)
    incoming = sequence.handoff_in(full)
    offset = slice_offsets(T, sequence.size, chunk_size, chunk_offset)[sequence.rank]
    y, out = deep_memory(q, k, v, theta, eta, alpha, chunk_size=chunk_size, state=incoming, chunk_offset=offset,
                         act=act, backend=backend)
    out = (tuple(out[0]), tuple(out[1]), tuple(out[2]))
    y = sequence.handoff_out(y, out)
    return y, out
