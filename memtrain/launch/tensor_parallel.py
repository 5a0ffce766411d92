"""Tensor parallelism through megatron-core: a LayerFactory of its parallel layers.

The model asks its factory for layers (see memtrain/model/factory.py); this factory answers with megatron-core's
ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding, and computes the loss with
vocab_parallel_cross_entropy. Parameter names stay those of the single-device model (`weight`), and
megatron marks every split parameter with `partition_dim`, which is all that merging shards
(`gather_full`) and loading full weights into shards (`shard_full`) need.

Megatron's layers take `[S, B, D]` in its own code, but used without their own sequence parallelism they only act
on the last dimension, so `[B, N, D]` is fine.

Sequence parallelism (Megatron-LM's SP, `parallel.sequence_parallel`): between TP regions each rank holds N / tp
rows of the residual stream; `SequenceParallelRegion` (memtrain/launch/sequence_parallel.py) all-gathers them into a
region and reduce-scatters the row layers' partial sums out of it. megatron-core's own SP path gathers along dim 0 of `[S, B, H]` into CUDA buffers;
memtrain keeps `[B, N, D]` (what its attention and memory kernels take), so it runs the same collectives along N
itself, on any backend (gloo included), and keeps megatron's layers for the matmuls with their reductions switched
off (`disable_grad_reduce` for columns, the partial sum for rows). docs/distributed.md, "Sequence parallelism".
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import nn

from memtrain.model.factory import LayerFactory, upcast_for_softmax

from .sequence_parallel import RegatherLinear, SequenceParallelRegion


def _normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class _Column(ColumnParallelLinear):
    """Column-parallel linear returning a tensor `[..., out / tp]` (megatron returns (out, bias)).

    Inside a sequence-parallel region, fed by `SequenceParallelRegion.enter`, it keeps only this rank's rows of its
    input for the backward and gathers them again there (`memtrain/launch/sequence_parallel.py`), as megatron's own SP linear does:
    the gathered input `[B, N, D]` is not held from the forward to the backward."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        regather = getattr(x, "_sp_regather", None)
        if regather is None or not self.disable_grad_reduce:
            return super().forward(x, weight)[0]
        rows, shared, span = regather
        return RegatherLinear.apply(x, self.weight if weight is None else weight, self.bias, rows, shared, span)


class _Row(RowParallelLinear):
    """Row-parallel linear: input `[..., in / tp]`, output `[..., out]` all-reduced over TP ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _PartialRow(RowParallelLinear):
    """Row-parallel linear inside a sequence-parallel region: `[..., in / tp]` -> this rank's partial sum
    `[..., out]`; the caller's `region.exit` reduce-scatters it (no bias: it would be added tp times)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(input=x, weight=self.weight, bias=None, gradient_accumulation_fusion=False,
                                  allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                  grad_output_buffer=None)


class _TiedColumn(nn.Module):
    """Output head that multiplies by the vocab-parallel embedding's weight slice `[V / tp, D]`."""

    def __init__(self, head: _Column, embedding: nn.Module):
        super().__init__()
        self.head = head
        self.__dict__["embedding"] = embedding  # not a submodule: the weight is saved once, by the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, self.embedding.weight)


class MegatronFactory(LayerFactory):
    """Layers split over the tensor-parallel group of megatron-core's `parallel_state`."""

    def __init__(self, params_dtype: torch.dtype = torch.float32, *, sequence_parallel: bool = False):
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("call memtrain.launch.groups.init_parallel(...) before building a tensor-parallel model")
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # CPU initialisation draws each full ("master") weight from the default generator, then keeps this
        # rank's slice: with the same seed on every rank the full weights agree with a TP = 1 model's draw.
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,
            sequence_parallel=False,  # megatron's own SP path: see the module docstring
        )
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        if self.sequence_parallel:
            self.region = SequenceParallelRegion(parallel_state.get_tensor_model_parallel_group())

    def column(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
               sequence_parallel: bool = False) -> nn.Module:
        return _Column(in_features, out_features, config=self.config, init_method=_normal(std), bias=bias,
                       gather_output=False, disable_grad_reduce=sequence_parallel and self.sequence_parallel)

    def row(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
            sequence_parallel: bool = False) -> nn.Module:
        if sequence_parallel and self.sequence_parallel:
            if bias:
                raise ValueError("a sequence-parallel row layer takes no bias (its partial sums are reduced later)")
            return _PartialRow(in_features, out_features, config=self.config, init_method=_normal(std),
                               bias=False, input_is_parallel=True, skip_bias_add=True)
        return _Row(in_features, out_features, config=self.config, init_method=_normal(std), bias=bias,
                    input_is_parallel=True, skip_bias_add=False)

    def embedding(self, vocab: int, dim: int, *, std: float) -> nn.Module:
        return VocabParallelEmbedding(vocab, dim, init_method=_normal(std), config=self.config)

    def lm_head(self, dim: int, vocab: int, *, std: float, tied: nn.Module | None = None) -> nn.Module:
        if tied is None:
            return self.column(dim, vocab, std=std, sequence_parallel=True)
        head = _Column(dim, vocab, config=self.config, init_method=_normal(std), bias=False,
                       gather_output=False, skip_weight_param_allocation=True,
                       disable_grad_reduce=self.sequence_parallel)
        return _TiedColumn(head, tied)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # megatron shifts its input by the row max in place: work on a copy, so the logits the model returns stay
        # the logits (a bf16 input is copied by the upcast anyway)
        upcast = upcast_for_softmax(logits)
        return vocab_parallel_cross_entropy(upcast.clone() if upcast is logits else upcast, targets)

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        return tuple(VocabUtility.vocab_range_from_global_vocab_size(vocab, self.tp_rank, self.tp_size))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return _GatherLastDim.apply(logits)


class _GatherLastDim(torch.autograd.Function):
    """All-gather `[..., V / tp]` slices into `[..., V]`; backward keeps this rank's slice of the gradient.

    megatron-core's gather_from_tensor_model_parallel_region does the same but allocates on CUDA.
    The backward is exact because whatever consumes the gathered tensor runs identically on every rank.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[..., ctx.rank * ctx.width: (ctx.rank + 1) * ctx.width].contiguous()


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension along which `param` is split over TP ranks, or None if it is replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def shard_full(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of a full (TP = 1) tensor, shaped like `param`."""
    dim = partition_dim(param)
    return full if dim is None else full.chunk(tp_size, dim=dim)[tp_rank]


def gather_full(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full tensor from every TP rank's slice (`tensor` is `param` or its gradient)."""
    dim = partition_dim(param)
    if dim is None or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)
