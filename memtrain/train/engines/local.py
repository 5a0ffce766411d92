"""Engines whose process holds every layer: the micro-batch loop they share, and the plain torch engine.

`LocalEngine.train_step` runs the micro-batches (forward, `backward`), then `step` (reduce, clip, update);
subclasses supply `backward` and `step`. `TorchEngine` is the reference every other layout is compared with:
data (× context) parallel gradients averaged by one flat all-reduce, the TP-aware clip of
memtrain/train/optim.py, AdamW, LambdaLR.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memtrain.launch.groups import (Layout, collective_device, data_context_parallel_group, data_parallel_group,
                                    tensor_parallel_group)
from memtrain.model.memory import memory_spec

from ..config import Config
from ..sharded import load_tensors, save_tensors
from ..optim import average_gradients, build_optimizer, build_scheduler, clip_gradients
from . import micro_batches
from .state import EngineTensors, engine_tensors, restore_small_state, small_state


class LocalEngine:
    """The micro-batch loop of an engine that runs the whole model in this process (module docstring)."""

    def __init__(self, model: nn.Module, cfg: Config, layout: Layout, precision: str = "fp32"):
        self.model = model
        self.cfg = cfg
        self.layout = layout
        self.precision = precision
        # the torch engine keeps fp32 weights and runs the forward under autocast; DeepSpeed casts the weights
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) \
            if self.casts_in_autocast else None
        self.tp_group = tensor_parallel_group() if layout.tp > 1 else None
        # CP ranks hold slices of the same sequences: losses (and gradients) are averaged like DP ones
        self.loss_ranks = layout.dp * layout.cp
        self.loss_group = (data_context_parallel_group() if layout.cp > 1 else data_parallel_group()) \
            if self.loss_ranks > 1 else None
        self.local = model.factory.sequence.local_slice if layout.cp > 1 else None
        self.own_backward = memory_spec(cfg.model.memory).own_backward(cfg.model)  # e.g. RMT memory replay

    casts_in_autocast = True  # DeepSpeedEngine: False (its weights are bf16 themselves)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def _forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device().type, dtype=self.autocast_dtype)

    def step(self) -> float:
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train_step(self, batches: list, tokens: int | None = None) -> tuple[float, float]:
        """One optimizer step over the micro-batches `batches`; returns (mean loss over DP × CP, grad norm)."""
        self.model.train()
        accum = len(batches)
        total = torch.zeros((), dtype=torch.float32, device=self._device())
        for x, y in micro_batches(batches, tokens, self.local, self._device()):
            if self.own_backward:
                # the kind's own backward (memory replay: segment by segment; torch engine only) accumulates
                # the micro-batch's full gradients, scaled to the mean over micro-batches below
                with self._forward_context():
                    loss = self.model.loss_and_backward(x, y) / accum
            else:
                with self._forward_context():
                    loss = self.module(x, y).loss / accum
                self.backward(loss)
            total += loss.detach().float()
        if self.own_backward and accum > 1:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(accum)
        norm = self.step()
        return float(self._mean_over_ranks(total)), norm  # the one host sync of the step

    @torch.no_grad()
    def eval_loss(self, batches: list) -> float:
        """Mean loss over `batches` (whole sequences; no update), averaged over DP × CP ranks."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64)
        pairs = micro_batches(batches, None, self.local, self._device())
        for x, y in pairs:
            with self._forward_context():
                total += self.module(x, y).loss.double().cpu()
        return float(self._mean_over_ranks(total / len(pairs)))

    def _mean_over_ranks(self, total: torch.Tensor) -> torch.Tensor:
        if self.loss_group is not None:
            total = total.to(collective_device())  # NCCL reduces GPU tensors only
            dist.all_reduce(total, group=self.loss_group)
            total /= self.loss_ranks
        return total


class TorchEngine(LocalEngine):
    """The plain loop: AdamW and the schedule of memtrain/train/optim.py, gradients averaged over DP by hand."""

    def __init__(self, model: nn.Module, cfg: Config, layout: Layout, precision: str = "fp32"):
        super().__init__(model, cfg, layout, precision)
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self._device().type) if precision == "fp16" else None
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        average_gradients(self.params, self.loss_group)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a step with inf/nan is skipped)
        norm = clip_gradients(self.params, self.cfg.optim.grad_clip, self.tp_group)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        return self.module.state_dict()

    def state_tensors(self) -> EngineTensors:
        return engine_tensors(dict(self.module.named_parameters()), self.optimizer, self.layout)

    def save(self, directory: Path) -> dict:
        save_tensors(directory / "state", self.state_tensors().save)
        state = small_state(self.optimizer, self.scheduler)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, directory: Path, state: dict) -> None:
        tensors = self.state_tensors()
        load_tensors(directory / "state", tensors.load)
        tensors.finish()
        restore_small_state(state, self.optimizer, self.scheduler)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
