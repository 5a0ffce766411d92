"""The DeepSpeed side of the layout: the JSON config built from ours, and the `mpu` DeepSpeed asks for.

DeepSpeed learns about tensor parallelism through an `mpu` object. Ours answers from megatron-core's
`parallel_state`, so ZeRO partitions over the data-parallel group only and the gradient norm counts
TP-split parameters on every rank but replicated ones once (DeepSpeed's `is_model_parallel_parameter`
reads the `tensor_model_parallel` mark that megatron-core puts on split weights).
"""
from __future__ import annotations

from typing import Any

from megatron.core import parallel_state as ps


def deepspeed_json(*, micro_batch: int, grad_accum: int, zero_stage: int, grad_clip: float,
                   bf16: bool, fp16: bool = False) -> dict[str, Any]:
    """DeepSpeed config for our engine; the optimizer and schedule are ours, passed as objects. fp16 turns on
    DeepSpeed's dynamic loss scaling (fp16 gradients underflow without it)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # our trainer logs; DeepSpeed's own prints would interleave with the bar
        "wall_clock_breakdown": False,
    }


class MegatronMPU:
    """The model-parallel unit DeepSpeed expects, backed by megatron-core's groups (model parallel = TP).

    With context parallelism (`with_context_parallel=True`) DeepSpeed's "data parallel" group is megatron-core's
    data × context parallel group: CP ranks hold equal slices of the same sequences, so their gradients are
    averaged like DP ones, and ZeRO partitions over all of them (megatron-core's distributed optimizer does the
    same).
    """

    def __init__(self, with_context_parallel: bool = False):
        self.with_context_parallel = with_context_parallel

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=self.with_context_parallel)

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=self.with_context_parallel)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=self.with_context_parallel)
