"""Sequence parallelism (Megatron-LM's SP) over the tensor-parallel group, along N of `[B, N, D]`.

Between tensor-parallel regions each of the tp ranks holds rows r·N/tp .. (r+1)·N/tp − 1 of the residual stream
(meta tokens included), so norms, residual adds and what autograd keeps for them are not replicated. Into a region
(attention, memory, MLP) the rows are all-gathered; out of it the row layers' partial sums are reduce-scattered
(instead of one all-reduce: the same bytes on the wire). The column layers inside keep only this rank's rows of
their input for the backward and gather them again there (`RegatherLinear`). The model asks for all of this through
`memtrain.model.factory.RegionOps`; docs/distributed.md, "Sequence parallelism".

megatron-core's own SP path gathers along dim 0 of `[S, B, H]` into CUDA buffers; memtrain's blocks take `[B, N, D]`
(the layout of its attention and memory kernels), so the collectives below run along dim 1 through a contiguous
`[tp·B, N / tp, D]` buffer, the same code on gloo and NCCL.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memtrain.model.factory import RegionOps


class SequenceParallelRegion(RegionOps):
    """`RegionOps` over the TP `group` (module docstring)."""

    active = True

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __deepcopy__(self, memo):  # a process group is a handle shared by the whole process, never copied
        return self

    def local_rows(self, rows: int) -> int:
        if rows % self.size:
            raise ValueError(f"sequence parallelism splits the {rows} positions of a sequence (meta tokens "
                             f"included) over tp={self.size} ranks: use a length that divides evenly")
        return rows // self.size

    def scatter(self, h: torch.Tensor) -> torch.Tensor:
        return _ToRows.apply(h, self, False)

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(h, self, False, None)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return _Gather.apply(x, self, True, None)
        regather = _Regather(self)
        full = _Gather.apply(x, self, True, regather)
        full._sp_regather = (x.detach(), regather, None)  # its column layers keep x (this rank's rows), not `full`
        return full

    def narrow(self, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        out = x[:, start:stop]
        info = getattr(x, "_sp_regather", None)
        if info is not None:  # a slice of a region input: its column layers still re-gather (then slice)
            rows, regather, span = info
            base = 0 if span is None else span.start
            end = base + (x.shape[1] if stop is None else stop)
            out._sp_regather = (rows, regather, slice(base + start, end))
        return out

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return _ToRows.apply(y, self, True)

    def sum_grad(self, weight: torch.Tensor) -> torch.Tensor:
        return _SumGrad.apply(weight, self)

    # ---- the collectives, along dim 1 ----

    def own_rows(self, x: torch.Tensor) -> torch.Tensor:
        n = self.local_rows(x.shape[1])
        return x[:, self.rank * n:(self.rank + 1) * n].contiguous()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n, ...]` on each rank -> `[B, tp·n, ...]` (rank order)."""
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])  # [tp·B, n, ...]: rank r's piece at r·B
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        return out.unflatten(0, (self.size, x.shape[0])).movedim(0, 1).flatten(1, 2)

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        """`[B, N, ...]` partial sums on each rank -> `[B, N / tp, ...]`: this rank's rows of their sum."""
        n = self.local_rows(y.shape[1])
        pieces = y.unflatten(1, (self.size, n)).movedim(1, 0).flatten(0, 1).contiguous()  # [tp·B, n, ...]
        out = y.new_empty(y.shape[0], n, *y.shape[2:])
        dist.reduce_scatter_single(out, pieces, group=self.group)
        return out


class _Regather:
    """The gathered input of the column layers one `enter` fed, rebuilt once in the backward for all of them.

    The rows themselves are saved by each `RegatherLinear` (autograd's saved tensors, so activation checkpointing
    drops and recomputes them like any other); this object holds the gathered tensor from the first of their
    backwards until the region entry's own backward, which runs after all of them, releases it."""

    def __init__(self, region: SequenceParallelRegion):
        self.region, self._full = region, None

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The gathered `[B, N, D]` of `rows` `[B, N / tp, D]` (gathered by the first caller)."""
        if self._full is None:
            self._full = self.region.all_gather(rows)
        return self._full

    def release(self) -> None:
        self._full = None


class RegatherLinear(torch.autograd.Function):
    """y = x Wᵀ + b for x `[B, N, D]` (or rows `span` of it) gathered from `rows` `[B, N / tp, D]`: the backward
    gathers x again from the rows it saved (`_Regather`) instead of keeping x. The input gradient is this rank's
    partial sum (the region's entry reduce-scatters it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, regather, span):
        ctx.save_for_backward(weight, rows)
        ctx.regather, ctx.span, ctx.has_bias, ctx.x_dtype = regather, span, bias is not None, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, rows = ctx.saved_tensors
        full = ctx.regather.take(rows)
        full = (full if ctx.span is None else full[:, ctx.span]).to(grad.dtype)
        grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = (g2.t() @ full.reshape(-1, full.shape[-1])).to(weight.dtype)
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None


class _ToRows(torch.autograd.Function):
    """`[B, N, D]` -> this rank's rows: of a replicated tensor (`reduce` False: keep them) or of partial sums
    (`reduce` True: reduce-scatter). Backward all-gathers: the producer's gradient is whole on every rank."""

    @staticmethod
    def forward(ctx, y, region, reduce):
        ctx.region = region
        return region.reduce_scatter(y) if reduce else region.own_rows(y)

    @staticmethod
    def backward(ctx, grad):
        return ctx.region.all_gather(grad), None, None


class _Gather(torch.autograd.Function):
    """Own rows -> `[B, N, D]`. Backward: `reduce` (consumers are sequence-parallel column layers, whose input
    gradients are partial sums) reduce-scatters; else (replicated consumers, full gradients) keeps own rows. It runs
    after every consumer's backward, so it releases their shared re-gathered input (`regather`)."""

    @staticmethod
    def forward(ctx, x, region, reduce, regather):
        ctx.region, ctx.reduce, ctx.regather = region, reduce, regather
        return region.all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        r = ctx.region
        if ctx.regather is not None:
            ctx.regather.release()
        return (r.reduce_scatter(grad) if ctx.reduce else r.own_rows(grad)), None, None, None


class _SumGrad(torch.autograd.Function):
    """Identity; the gradient (from this rank's rows only) is summed over the TP group."""

    @staticmethod
    def forward(ctx, w, region):
        ctx.region = region
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.region.group)
        return grad, None
