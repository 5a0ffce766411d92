"""Configuration of the parallel layout (the trainer hands this section to `launch`)."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """The requested parallel layout does not fit the world size or the model; the message says which."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core layers); must divide the attention heads and KV heads."""

    dp: int = 0
    """Data-parallel size; 0 takes what is left of the world size after tensor, context and pipeline
    parallelism."""

    pp: int = 1
    """Pipeline-parallel stages (DeepSpeed PipelineModule, memtrain/launch/pipeline.py; RMT: memtrain/launch/rmt_pipeline.py's
    schedule); at most model.n_layers, and only with parallel.zero_stage 0 or 1 (0 for RMT). Ranks are ordered tp fastest, then cp, then dp, then pp (megatron's
    order)."""

    cp: int = 1
    """Context-parallel size: each of cp ranks holds a contiguous slice of every sequence (data.seq_len / cp
    tokens; memtrain/launch/context_parallel.py). Ranks are ordered tp fastest, then cp, then dp, then pp (megatron-core's
    order); CP peers read the same batches. Gradients are averaged, and ZeRO partitions, over data × context
    parallel ranks. With parallel.pp > 1 each stage is context parallel (not for model.memory = "rmt")."""

    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""

    timeout_s: int = 600
    """Seconds a collective may wait for the other ranks before the job stops (a hung or lost rank)."""

    engine: str = "auto"
    """Who runs the optimizer step: deepspeed, torch (plain loop), or auto (deepspeed when more than one
    process or zero_stage > 0, else torch)."""

    activation_checkpoint_interval: int = 0
    """Pipeline engine: recompute every k consecutive blocks in the backward instead of storing their
    activations (1 = every block, 0 = off)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (partitions optimizer state, gradients, parameters over data × context
    parallel ranks)."""
