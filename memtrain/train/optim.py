"""AdamW with decay on matrices only, warm-up + cosine schedule, and a tensor-parallel-aware grad norm."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from memtrain.launch.tensor_parallel import partition_dim

from .config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2, embeddings included) decay, vectors (norms, biases) and meta tokens don't."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "meta" not in name.split(".")[-1] else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warm-up, then cosine to `min_lr_ratio`."""
    warmup = cfg.warmup()
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def grad_norm(params: list[nn.Parameter], tp_group=None, pipe_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of the whole (unsplit) model, as a 0-dim tensor on their device: the
    single-process number under every layout (the one gradient norm of every engine).

    `params` holds each parameter of this rank once (a pipeline stage leaves out its second copy of a tied
    weight). TP-split parameters contribute their slice on each TP rank, so their squares are summed over
    `tp_group`; replicated parameters (norms, meta tokens) carry the same gradient on every TP rank and count
    once. Pipeline stages hold disjoint parameters: their totals are summed over `pipe_group`. Per-tensor norms
    come from one fused `_foreach_norm` in the gradients' dtype; their squares are summed in fp64 (a few scalars;
    exact for fp64 models). Returns a 0-dim fp64 tensor; no host sync until the caller reads the value.
    """
    split = [p.grad for p in params if p.grad is not None and partition_dim(p) is not None]
    replicated = [p.grad for p in params if p.grad is not None and partition_dim(p) is None]
    grads = split or replicated
    device = grads[0].device if grads else torch.device("cpu")

    def sum_sq(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float64)
        return torch.stack([n.double() for n in torch._foreach_norm(grads)]).pow(2).sum()

    split_sq = sum_sq(split)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(split_sq, group=tp_group)
    total = split_sq + sum_sq(replicated)
    if pipe_group is not None and dist.get_world_size(pipe_group) > 1:
        dist.all_reduce(total, group=pipe_group)
    return total.sqrt()


def clip_gradients(params: list[nn.Parameter], max_norm: float, tp_group=None, pipe_group=None, *,
                   counted: list[nn.Parameter] | None = None) -> float:
    """Scale the gradients of `params` so their global norm is at most `max_norm` (0: no clipping); returns the
    norm, `grad_norm` of `counted` (default `params`; a pipeline stage counts a tied weight's copy once)."""
    norm = float(grad_norm(params if counted is None else counted, tp_group, pipe_group))  # one host sync
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], max_norm / (norm + 1e-6))
    return norm


def average_gradients(params: list[nn.Parameter], dp_group) -> None:
    """Mean of the gradients over data-parallel ranks, one flat all-reduce."""
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    # Every parameter takes part, with zeros where this rank produced no gradient, so the flat buffers
    # have the same layout on every rank even when a code path skipped some weights on one of them.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=dp_group)
    flat /= dist.get_world_size(dp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
