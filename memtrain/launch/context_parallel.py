"""Context parallelism (CP): each rank of a CP group holds a contiguous slice of every sequence.

With CP size c and a text of T tokens, rank r holds text positions r·T/c .. (r+1)·T/c − 1 (T_l = T/c of them)
and the whole prefix (the P meta tokens, replicated and recomputed on every rank). `ContextParallel` is the
`memtrain.model.factory.SequenceOps` the model calls (`factory.sequence = ContextParallel()`), so the model code names
no process group. What crosses ranks (docs/distributed.md, docs/distributed.md "Context parallel"):

* attention, windowed layer (W − 1 <= T_l): the halo, the last W − 1 keys and values of rank r − 1
  (`[2, B, Hkv, W − 1, Dh]`, post-rotary), point to point; its gradient goes back the same way.
* attention, global layer (or W − 1 > T_l): an all-gather of every rank's text keys and values
  (`[c, 2, B, Hkv, T_l, Dh]`); rank r keeps ranks < r (a windowed layer keeps their last W − 1). The backward
  all-reduces the gradient of the gathered tensor and keeps this rank's part.
* Titans short conv (LMM, MAG, MAL): the halo, the last K − 1 pre-conv projections of rank r − 1.
* recurrent state (RMT memory, Titans deep memory, MAC): `handoff_in` receives rank r − 1's final state,
  `handoff_out` sends this rank's final state to rank r + 1; the gradient of the state travels back.
* Titans linear memory: all-gather of each rank's affine map of its slice, composed locally
  (memtrain/kernels/titans/context_parallel.py).

Every rank computes its attention over the local sequence [prefix; context; own slice] with the ordinary
kernel, its queries being [prefix queries; C zero rows; own queries] (the C context rows are dropped), so
each backend's exact mask (docs/attention.md) applies unchanged. Per-rank losses are means over equal slices: the
mean over CP ranks of the per-rank losses and gradients is the single-process loss and gradient.

Ordering: every rank must run the same sequence of these calls (same layers, same hand-offs), and the output
returned by `handoff_out` must reach the loss, else the neighbour's backward waits forever.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtrain.model.config import ModelConfig
from memtrain.model.factory import SequenceOps

from .config import LayoutError, ParallelConfig, check_layout

__all__ = ["ContextParallel", "check_context_parallel"]


def _p2p(send: torch.Tensor | None, dst: int | None, recv: torch.Tensor | None, src: int | None, group) -> None:
    """Send `send` to global rank `dst` and receive into `recv` from `src` at once (either may be None)."""
    reqs = []
    if send is not None:
        reqs.append(dist.isend(send.contiguous(), dst, group=group))
    if recv is not None:
        reqs.append(dist.irecv(recv, src, group=group))
    for req in reqs:
        req.wait()


class _Halo(torch.autograd.Function):
    """tail (this rank's last H positions along `dim`) -> the previous rank's tail (rank 0: 0 positions).

    Backward: the gradient of the received halo goes back to the previous rank; the next rank's gradient of
    this rank's tail arrives here (zero on the last rank: its tail is nobody's halo).
    """

    @staticmethod
    def forward(ctx, tail: torch.Tensor, cp: ContextParallel, dim: int) -> torch.Tensor:
        ctx.cp, ctx.tail_shape = cp, tail.shape
        first, last = cp.rank == 0, cp.rank == cp.size - 1
        shape = list(tail.shape)
        shape[dim] = 0 if first else shape[dim]
        received = tail.new_empty(shape)
        _p2p(None if last else tail, cp.next, None if first else received, cp.prev, cp.group)
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = ctx.cp
        first, last = cp.rank == 0, cp.rank == cp.size - 1
        grad_tail = grad.new_zeros(ctx.tail_shape)
        _p2p(None if first else grad, cp.prev, None if last else grad_tail, cp.next, cp.group)
        return grad_tail, None, None


class _AllGather(torch.autograd.Function):
    """x `[...]` -> `[c, ...]` (every rank's x); backward: the gradients summed over ranks, this rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        ctx.cp = cp
        out = x.new_empty((cp.size,) + x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # gloo has no reduce-scatter: all-reduce, then keep this rank's part
        dist.all_reduce(grad, group=ctx.cp.group)
        return grad[ctx.cp.rank], None


class _Receive(torch.autograd.Function):
    """Receive the previous rank's state (flat tensors shaped like `templates`); backward sends its gradient
    back. `anchor` (a scalar that requires grad) keeps the node in the graph when no template needs grad."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, cp: ContextParallel, *templates: torch.Tensor):
        ctx.cp = cp
        ctx.meta = [(t.shape, t.dtype, t.device) for t in templates]
        out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in templates]
        for t in out:
            _p2p(None, None, t, cp.prev, cp.group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        cp = ctx.cp
        for g, (shape, dtype, device) in zip(grads, ctx.meta):
            g = torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            _p2p(g, cp.prev, None, None, cp.group)
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
        return (None, None, *zeros)


class _Send(torch.autograd.Function):
    """Send this rank's final state to the next rank; returns `out` unchanged. Backward receives the next
    rank's gradient of the state and adds it to this rank's."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, cp: ContextParallel, *state: torch.Tensor):
        ctx.cp = cp
        ctx.meta = [(t.shape, t.dtype, t.device) for t in state]
        for t in state:
            _p2p(t, cp.next, None, None, cp.group)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *_):
        cp = ctx.cp
        grads = [torch.empty(s, dtype=d, device=dev) for s, d, dev in ctx.meta]
        for g in grads:
            _p2p(None, None, g, cp.next, cp.group)
        return (grad_out, None, *grads)


class ContextParallel(SequenceOps):
    """Sequence ops over a CP group (megatron-core's context-parallel group unless `group` is given).

    Ranks of the group hold consecutive slices in group-rank order; every rank must hold a slice of the
    same length T_l (the trainer cuts `[B, T]` batches with `local_slice`).
    """

    def __init__(self, group=None):
        if group is None:
            from megatron.core import parallel_state
            group = parallel_state.get_context_parallel_group()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.prev = ranks[self.rank - 1] if self.rank > 0 else None
        self.next = ranks[self.rank + 1] if self.rank < self.size - 1 else None

    def __deepcopy__(self, memo):  # a process group is a handle shared by the whole process, never copied
        return self

    # ---- layout ------------------------------------------------------------------------------------

    def text_offset(self, local_len: int) -> int:
        return self.rank * local_len

    def local_slice(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of `x` along `dim` (e.g. tokens `[B, T]` -> `[B, T / c]`)."""
        n = x.shape[dim]
        if n % self.size:
            raise LayoutError(f"sequence of {n} tokens does not split into parallel.cp={self.size} equal slices: "
                              f"use a sequence length divisible by {self.size}")
        return x.narrow(dim, self.rank * (n // self.size), n // self.size)

    # ---- attention ---------------------------------------------------------------------------------

    def attention(self, q, k, v, *, num_prefix: int, window: int | None, backend: str) -> torch.Tensor:
        """q `[B, Hq, P + T_l, Dh]`, k/v `[B, Hkv, P + T_l, Dh]` (post-rotary, global positions) ->
        `[B, Hq, P + T_l, Dh]`, equal to the rows of this slice in single-process attention over the sequence."""
        from memtrain.kernels.attention import attention
        P = num_prefix
        T = q.shape[2] - P
        if self.size == 1 or window == 1:  # window 1: every text query sees only itself (and the prefix)
            return attention(q, k, v, num_prefix=P, window=window, backend=backend)
        if window is not None and window - 1 <= T:
            n = window - 1  # only the tail is stacked into one message: [2, B, Hkv, W-1, Dh]
            tail = torch.stack([k[:, :, k.shape[2] - n:], v[:, :, v.shape[2] - n:]])
            context = self.halo(tail, n, dim=3)  # [2, B, Hkv, W-1 (0 on rank 0), Dh]
        else:
            kv = torch.stack([k[:, :, P:], v[:, :, P:]])  # [2, B, Hkv, T_l, Dh]
            gathered = _AllGather.apply(kv, self)  # [c, 2, B, Hkv, T_l, Dh]
            # ranks < r in order along the sequence: [2, B, Hkv, r·T_l, Dh] (empty, but in the graph, on rank 0:
            # its backward must run on every rank, it is a collective)
            earlier = gathered[: self.rank].permute(1, 2, 3, 0, 4, 5)
            context = earlier.reshape(*earlier.shape[:3], -1, earlier.shape[-1])
            if window is not None:
                context = context[:, :, :, max(0, context.shape[3] - (window - 1)):]
        C = context.shape[3]
        k_loc = torch.cat([k[:, :, :P], context[0], k[:, :, P:]], dim=2)
        v_loc = torch.cat([v[:, :, :P], context[1], v[:, :, P:]], dim=2)
        q_loc = torch.cat([q[:, :, :P], q.new_zeros(q.shape[0], q.shape[1], C, q.shape[3]), q[:, :, P:]], dim=2)
        o = attention(q_loc, k_loc, v_loc, num_prefix=P, window=window, backend=backend)
        return torch.cat([o[:, :, :P], o[:, :, P + C:]], dim=2)

    def halo(self, x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """The previous rank's last `n` positions of `x` along `dim` (rank 0: 0 positions); differentiable.
        Every rank sends its own last n (n <= its length along dim). Use the result on every rank, rank 0's
        empty one too (e.g. concatenate it), so its backward, which communicates, runs everywhere."""
        if not 0 < n <= x.shape[dim]:
            raise ValueError(f"halo of {n} positions needs 0 < n <= the local length {x.shape[dim]}")
        return _Halo.apply(x.narrow(dim, x.shape[dim] - n, n), self, dim)

    # ---- recurrent state ---------------------------------------------------------------------------

    def handoff_in(self, state, *, differentiable: bool = True):
        """Rank 0: `state`; rank r > 0: rank r − 1's final state, shaped like `state` (a tensor or nested
        tuple of tensors; None leaves stay None and are not sent). Differentiable: its gradient is sent back to
        rank r − 1 in the backward."""
        if self.rank == 0:
            return state
        flat, spec = tree_flatten(state)
        tensors = [t for t in flat if t is not None]
        if not differentiable:
            received = [torch.empty_like(t) for t in tensors]
            for t in received:
                _p2p(None, None, t, self.prev, self.group)
        else:
            anchor = torch.zeros((), requires_grad=True)
            received = list(_Receive.apply(anchor, self, *tensors))
        it = iter(received)
        return tree_unflatten([None if t is None else next(it) for t in flat], spec)

    def handoff_out(self, out: torch.Tensor, state, *, differentiable: bool = True) -> torch.Tensor:
        """Send `state` to rank r + 1 (nothing on the last rank); returns `out`, which must reach the loss."""
        if self.rank == self.size - 1:
            return out
        flat = [t for t in tree_flatten(state)[0] if t is not None]
        if not differentiable:
            for t in flat:
                _p2p(t.detach(), self.next, None, None, self.group)
            return out
        return _Send.apply(out, self, *flat)

    # ---- Titans memory -----------------------------------------------------------------------------

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x `[...]` -> `[c, ...]`, differentiable (backward: summed over ranks, this rank's part)."""
        return _AllGather.apply(x, self)

    def linear_memory(self, q, k, v, theta, eta, alpha, *, chunk_size: int, state=None, chunk_offset: int = 0,
                      backend: str = "auto"):
        from memtrain.kernels.titans.context_parallel import linear_memory_context_parallel
        return linear_memory_context_parallel(q, k, v, theta, eta, alpha, chunk_size=chunk_size, state=state,
                                              chunk_offset=chunk_offset, rank=self.rank, size=self.size,
                                              all_gather=self.all_gather, backend=backend)

    def deep_memory(self, q, k, v, theta, eta, alpha, *, chunk_size: int, state, chunk_offset: int = 0,
                    act: str = "gelu", backend: str = "auto"):
        from memtrain.kernels.titans.context_parallel import deep_memory_context_parallel
        return deep_memory_context_parallel(q, k, v, theta, eta, alpha, chunk_size=chunk_size, state=state,
                                            sequence=self, chunk_offset=chunk_offset, act=act, backend=backend)


def check_context_parallel(model: ModelConfig, seq_len: int, cp: int) -> None:
    """Raise LayoutError (one line, naming the fix) when `model` cannot run `seq_len` tokens over `cp` ranks: the
    context-parallel rules of `check_layout` (memtrain/launch/config.py), which the trainer's config check runs."""
    if cp < 1:
        raise LayoutError(f"parallel.cp must be >= 1, got {cp}")
    check_layout(model, ParallelConfig(cp=cp), seq_len)
