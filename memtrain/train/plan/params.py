"""Which parameters each rank holds: the model built on the meta device, split as megatron-core and DeepSpeed split it.

    shapes = model_params(cfg.model)                  # every parameter, full size, no memory allocated
    stage_numel(shapes, cfg.model, tp, pp, stage)     # parameters of pipeline stage `stage` on one TP rank

Tensor parallelism (memtrain/launch/tensor_parallel.py, MegatronFactory): a layer the model asks its factory for as a
`column` (qkv, gate, up, the Titans memory's query/kv/gates, the output head) is split along dim 0 of its weight and
bias; a `row` layer (attention out, MLP down, the memory's out) along dim 1 of its weight; the vocabulary-parallel
`embedding` along dim 0. Per-head Titans parameters the factory does not make (conv taps, the initial memory M_0)
carry megatron's `partition_dim` mark themselves (memtrain/model/memory/titans/memory.py). Everything else (norms,
meta tokens, RMT memory rows) is replicated. The planner's factory records those roles on the meta layers instead of
building megatron's, so the count is exact without process groups (tests/e2e/test_plan.py checks it against a real
TP = 2 build).

Pipeline stages (docs/pipeline.md): DeepSpeed's PipelineModule over [tokens, MetaPrefix, *blocks, head, (tied)]
with partition_method "type:^(Block|...)$" -- DeepSpeed's `partition_balanced` over 1 for a block, 0 otherwise
(`memtrain.launch.pipeline.stage_parts`, what the trainer builds per stage); the RMT's own schedule splits its
blocks the same way (memtrain/launch/rmt_pipeline.py, tests/unit/test_plan.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from memtrain.model.config import ModelConfig
from memtrain.model.factory import LayerFactory

from ..configtree import ConfigError

SPLIT = "_plan_split"  # attribute the planner's factory puts on a parameter: the TP split dim (0 or 1)


class _PlanFactory(LayerFactory):
    """Plain layers left on the meta device (LayerFactory draws real CPU weights), their TP role recorded."""

    def _linear(self, in_features: int, out_features: int, bias: bool, weight_dim: int, bias_split: bool):
        layer = nn.Linear(in_features, out_features, bias=bias, device="meta")
        setattr(layer.weight, SPLIT, weight_dim)
        if bias and bias_split:  # megatron splits a column layer's bias with its rows, a row layer's is whole
            setattr(layer.bias, SPLIT, 0)
        return layer

    def column(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
               sequence_parallel: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias, 0, True)

    def row(self, in_features: int, out_features: int, *, std: float, bias: bool = False,
            sequence_parallel: bool = False) -> nn.Module:
        return self._linear(in_features, out_features, bias, 1, False)

    def embedding(self, vocab: int, dim: int, *, std: float) -> nn.Module:
        layer = nn.Embedding(vocab, dim, device="meta")
        setattr(layer.weight, SPLIT, 0)
        return layer


# Constructors left on CPU: the model reads them as Python numbers while it is built (a seed draw per part,
# `int(torch.randint(...))`; the head's vocabulary range), which a meta tensor cannot answer. They are a few KB.
_ON_CPU = (torch.arange, torch.randint)


class _MetaDevice(TorchFunctionMode):
    """Every tensor constructor on the meta device, over an explicit `device` too (LayerFactory's `to_empty(
    device="cpu")`), except the few small ones in `_ON_CPU`: `with torch.device("meta")` alone cannot build the
    model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _constructors() and func not in _ON_CPU:
            kwargs["device"] = "meta"  # also over an explicit device: nothing of the model is allocated
        return func(*args, **kwargs)


@cache
def _constructors() -> frozenset:
    from torch.utils._device import _device_constructors
    return frozenset(_device_constructors())


@dataclass(frozen=True)
class Param:
    """One parameter of the full model."""

    name: str
    shape: tuple[int, ...]
    split_dim: int | None
    """Dimension megatron-core splits over TP ranks; None = replicated on every TP rank."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numel_on_rank(self, tp: int) -> int:
        """Elements one of `tp` TP ranks holds (megatron divides exactly; the planner checks divisibility)."""
        if self.split_dim is None or tp == 1:
            return self.numel
        size = self.shape[self.split_dim]
        if size % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide dim {self.split_dim} ({size}) of parameter "
                              f"{self.name} {self.shape}: choose a tp that divides it")
        return self.numel // tp


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """The model of kind `cfg.memory` on the meta device: shapes only, no memory, TP roles marked."""
    from memtrain.model import build_model
    if cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size is 0 and no prepared dataset gives it: set model.vocab_size "
                          "(e.g. --set model.vocab_size=32000)")
    try:
        with _MetaDevice():
            return build_model(cfg, _PlanFactory())
    except (RuntimeError, NotImplementedError) as e:  # a kind that reads tensor values while it is built
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot build model.memory={cfg.memory!r} on the meta device to plan it ({first}): "
                          f"its constructor must not read tensor values") from None


def model_params(cfg: ModelConfig) -> list[Param]:
    """Every parameter of the model (tied weights once) with its TP split dimension."""
    model = build_meta_model(cfg)
    out = []
    for name, p in model.named_parameters():
        dim = getattr(p, SPLIT, None)
        if dim is None and getattr(p, "tensor_model_parallel", False):  # Titans per-head tensors mark themselves
            dim = int(p.partition_dim)
        out.append(Param(name, tuple(p.shape), dim))
    return out


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> tuple[range, bool, bool]:
    """(blocks, has embedding, has head) of pipeline stage `stage` of `pp`: the split the trainer builds
    (`memtrain.launch.pipeline.stage_parts`, DeepSpeed's own partitioning; the RMT's schedule splits alike)."""
    if pp == 1:
        return range(cfg.n_layers), True, True
    parts = _stage_parts(cfg.n_layers, bool(cfg.tie_embeddings), pp, stage)
    blocks = [i for i in range(cfg.n_layers) if f"blocks.{i}" in parts]
    return range(blocks[0], blocks[-1] + 1) if blocks else range(0), stage == 0, "head" in parts


@cache
def _stage_parts(n_layers: int, tied: bool, pp: int, stage: int) -> frozenset[str]:
    from types import SimpleNamespace

    from memtrain.launch.pipeline import stage_parts
    return frozenset(stage_parts(SimpleNamespace(n_layers=n_layers, tie_embeddings=tied), pp, stage))


def on_stage(name: str, cfg: ModelConfig, pp: int, stage: int) -> bool:
    """Whether parameter `name` lives on pipeline stage `stage` (a tied embedding: on first and last)."""
    blocks, first, last = stage_layers(cfg, pp, stage)
    if name.startswith("blocks."):
        return int(name.split(".")[1]) in blocks
    if name == "embed.tokens.weight":
        return first or (last and cfg.tie_embeddings)
    if name.startswith("head.") or name.startswith("memory_norm."):
        return last
    return first  # embed.meta, the RMT's memory rows


def stage_numel(params: list[Param], cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds under tensor parallelism `tp`."""
    return sum(p.numel_on_rank(tp) for p in params if on_stage(p.name, cfg, pp, stage))
