"""DeepSpeed's engine around our model, optimizer and schedule: ZeRO 0-3, bf16, clipping, accumulation.

The micro-batch loop is `LocalEngine`'s (memtrain/train/engines/local.py); DeepSpeed reduces, clips and updates
inside the last micro-batch's `backward`, so `step` only reports the gradient norm.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memtrain.launch.shm import release_shm_buffers
from memtrain.launch.groups import Layout

from ..config import Config
from ..optim import build_optimizer, build_scheduler, grad_norm
from ..sharded import load_tensors, save_tensors
from .state import EngineTensors, engine_tensors, restore_small_state, small_state
from .local import LocalEngine


class DeepSpeedEngine(LocalEngine):
    """DeepSpeed's engine around our model, optimizer and schedule (ZeRO 0-3, bf16, clipping, accumulation)."""

    casts_in_autocast = False  # DeepSpeed holds the weights in bf16/fp16 itself (fp32 master copies)

    def __init__(self, model: nn.Module, cfg: Config, layout: Layout, run_dir: Path | None, precision: str):
        import deepspeed

        from memtrain.launch.deepspeed_config import MegatronMPU, deepspeed_json

        super().__init__(model, cfg, layout, precision)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule)
        self.json = deepspeed_json(micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                                   zero_stage=cfg.parallel.zero_stage, grad_clip=cfg.optim.grad_clip,
                                   bf16=precision == "bf16", fp16=precision == "fp16")
        if layout.rank == 0 and run_dir is not None:  # saved with the run, for the record
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed.json").write_text(json.dumps(self.json, indent=2))
        # with CP, DeepSpeed's "data parallel" group is DP × CP (gradients averaged, ZeRO partitioned over both)
        mpu = MegatronMPU(with_context_parallel=layout.cp > 1) if dist.is_initialized() else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.json, mpu=mpu)
        release_shm_buffers()  # DeepSpeed's CPU all-reduce buffers leave /dev/shm with the last rank
        self.module = self.engine.module
        self.zero_stage = cfg.parallel.zero_stage
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self._norm = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed's own protocol is backward + step per micro-batch: it counts micro-steps, reduces
        # gradients and updates only at the accumulation boundary. The micro-batch loop already divided the loss
        # by the accumulation steps, so DeepSpeed must not divide again.
        if self.zero_stage > 0:
            # DeepSpeed resets ZeRO's per-micro-step hook state in its own forward, which the micro-batch loop bypasses
            # (it calls the model): without this, ZeRO-3 overwrites instead of accumulating micro-batch grads.
            self.engine.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.zero_stage == 0 and self.precision != "fp16" and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO DeepSpeed clips but keeps no norm; the gradients are DP-averaged by now.
            self._norm = grad_norm(self.params, self.tp_group)
        self.engine.step()

    def step(self) -> float:
        """The update already ran inside the last micro-batch's `backward`; report its gradient norm."""
        if self.zero_stage == 0 and self.precision != "fp16":  # fp16: the gradients are loss-scaled until DeepSpeed
            return float(self._norm)                            # unscales them; its own norm is the true one
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        """The full (TP-shard) weights; ZeRO-3 partitions are gathered first (collective)."""
        if self.zero_stage < 3:
            return self.module.state_dict()
        import deepspeed
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def state_tensors(self) -> EngineTensors:
        return engine_tensors(dict(self.module.named_parameters()), self.engine.optimizer, self.layout)

    def save(self, directory: Path) -> dict:
        save_tensors(directory / "state", self.state_tensors().save)
        return small_state(self.engine.optimizer, self.scheduler, self.engine)

    def load(self, directory: Path, state: dict) -> None:
        tensors = self.state_tensors()
        load_tensors(directory / "state", tensors.load)
        tensors.finish()
        restore_small_state(state, self.engine.optimizer, self.scheduler, self.engine)
