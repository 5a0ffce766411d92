"""Configuration of the parallel layout (the trainer hands this section to `launch`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core layers); must divide the attention heads and KV heads."""

    dp: int = 0
    """Data-parallel size; 0 takes what is left of the world size after tensor parallelism."""

    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."""

    engine: str = "auto"
    """Who runs the optimizer step: deepspeed, torch (plain loop), or auto (deepspeed when more than one
    process or zero_stage > 0, else torch)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (partitions optimizer state, gradients, parameters over data parallel)."""
