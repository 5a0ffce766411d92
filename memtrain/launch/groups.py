"""Process groups and the parallel layout.

`init_parallel` starts torch.distributed from the launcher's environment (torchrun, deepspeed, SLURM
via srun + torchrun) when there is more than one process, checks the layout against the world size,
and builds megatron-core's groups (tensor parallel fastest, then context parallel, then data parallel, then
pipeline stages: megatron-core's default order "tp-cp-ep-dp-pp", so its data-parallel group excludes the CP
peers, which read the same batches).

    rank = tp_rank + tp · (cp_rank + cp · (dp_rank + dp · pp_rank))
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .config import LayoutError, ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Sizes and this process's coordinates in the tp × cp × dp × pp grid (tp fastest, then cp, dp, pp)."""

    world: int
    rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    pp: int = 1
    pp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0


def resolve_layout(cfg: ParallelConfig, world: int, rank: int = 0) -> Layout:
    """Check that the sizes multiply to the world size and work out this rank's coordinates.

    The rules that involve the model or the sequence length (stages <= layers, whole CP slices, ZeRO with a
    pipeline, what each memory kind supports) are `memtrain.launch.config.check_layout`'s, which the config
    check runs before any process group exists.
    """
    if cfg.tp < 1 or world % cfg.tp:
        raise LayoutError(f"parallel.tp={cfg.tp} does not divide the world size {world}: "
                          f"launch a multiple of {cfg.tp} processes or change parallel.tp")
    pp, cp = cfg.pp, cfg.cp
    if pp < 1 or world % (cfg.tp * pp):
        raise LayoutError(f"parallel.pp={pp} × parallel.tp={cfg.tp} does not divide the world size {world}: "
                          f"launch a multiple of {cfg.tp * max(pp, 1)} processes or change parallel.pp")
    if cp < 1 or world % (cfg.tp * pp * cp):
        raise LayoutError(f"parallel.cp={cp} × parallel.tp={cfg.tp} × parallel.pp={pp} does not divide the world "
                          f"size {world}: launch a multiple of {cfg.tp * pp * max(cp, 1)} processes or change "
                          f"parallel.cp")
    dp = world // (cfg.tp * pp * cp)
    if cfg.dp and cfg.dp != dp:
        raise LayoutError(f"parallel.dp={cfg.dp} × parallel.tp={cfg.tp} × parallel.cp={cp} × parallel.pp={pp} "
                          f"!= world size {world}: set parallel.dp={dp} or 0 (derived)")
    # Megatron's order: tensor-parallel ranks are adjacent (fastest), context-parallel ranks stride by tp,
    # data-parallel ranks by tp × cp, pipeline stages by tp × cp × dp (DeepSpeed's PipeModelDataParallelTopology
    # lays ranks out the same way, with its data axis = cp_rank + cp · dp_rank).
    return Layout(world=world, rank=rank, tp=cfg.tp, dp=dp, tp_rank=rank % cfg.tp,
                  dp_rank=(rank // (cfg.tp * cp)) % dp, pp=pp, pp_rank=rank // (cfg.tp * cp * dp),
                  cp=cp, cp_rank=(rank // cfg.tp) % cp)


def world_from_env() -> tuple[int, int]:
    """(world size, rank) as set by the launcher; (1, 0) for a plain `python -m memtrain.train`."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def init_parallel(cfg: ParallelConfig, device: torch.device) -> Layout:
    """Start torch.distributed if needed and build megatron-core's TP/CP/DP/PP groups; returns the layout.

    megatron-core's `initialize_model_parallel(context_parallel_size=...)` builds the CP groups (it runs on
    gloo/CPU too), so its data-parallel group excludes CP peers and `get_data_parallel_group(
    with_context_parallel=True)` is the group gradients are averaged over.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else world_from_env()
    layout = resolve_layout(cfg, world, rank)
    if world == 1 and not dist.is_initialized():
        return layout
    if not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":  # one GPU per rank (the launchers give every rank all of them)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tp,
                                                 pipeline_model_parallel_size=layout.pp,
                                                 context_parallel_size=layout.cp,
                                                 create_gloo_process_groups=False)
    return layout


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def data_parallel_group():
    """The group of ranks that see different data (None when not distributed)."""
    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def context_parallel_group():
    """The group of ranks that hold slices of the same sequences (None when not distributed)."""
    return parallel_state.get_context_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def data_context_parallel_group():
    """Data × context parallel: the ranks over which gradients are averaged (None when not distributed)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def tensor_parallel_group():
    return parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
              "NCCL communicator was aborted", "DistNetworkError")


def is_lost_peer(error: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or stopped answering."""
    if not dist.is_initialized():
        return False
    return isinstance(error, dist.DistError) or any(s in str(error) for s in _LOST_PEER)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
