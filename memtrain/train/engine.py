"""Who performs an optimizer step: a plain torch loop or the DeepSpeed engine, behind one interface.

    engine.backward(loss)      # one micro-batch (loss already divided by the accumulation steps)
    norm = engine.step()       # DP reduce, clip, update, schedule; returns the global gradient norm
    engine.save(dir) / engine.load(dir), engine.lr, engine.module

The torch engine is the reference: data parallelism by one flat all-reduce, the TP-aware clip of
memtrain/train/optim.py, AdamW, LambdaLR. The DeepSpeed engine gets the same optimizer and schedule objects and
adds ZeRO 1-3 and bf16; the dist tests check that both give the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memtrain.launch.groups import Layout, data_context_parallel_group, data_parallel_group, tensor_parallel_group

from .config import Config, ConfigError
from .optim import average_gradients, build_optimizer, build_scheduler, clip_gradients, grad_norm


def use_deepspeed(cfg: Config, layout: Layout) -> bool:
    engine = cfg.parallel.engine
    if layout.pp > 1:
        return True  # the pipeline engines (DeepSpeed's schedule; RMT's own, memtrain/launch/rmt_pipeline.py)
    if engine == "auto":
        replay = cfg.model.memory == "rmt" and cfg.model.rmt.memory_replay  # runs its own backward
        return (layout.world > 1 or cfg.parallel.zero_stage > 0) and not replay
    return engine == "deepspeed"


class TorchEngine:
    """The plain loop: AdamW and the schedule of memtrain/train/optim.py, gradients averaged over DP by hand."""

    def __init__(self, model: nn.Module, cfg: Config, layout: Layout):
        self.module = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        # CP ranks hold slices of the same sequences: their gradients are averaged like DP ones (equal slices)
        self.dp_group = (data_context_parallel_group() if layout.cp > 1 else data_parallel_group()) \
            if layout.dp * layout.cp > 1 else None
        self.tp_group = tensor_parallel_group() if layout.tp > 1 else None
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        average_gradients(self.params, self.dp_group)
        norm = clip_gradients(self.params, self.cfg.optim.grad_clip, self.tp_group)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def model_state(self) -> dict:
        return self.module.state_dict()

    def save(self, directory: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, directory: Path, state: dict) -> None:
        if "optimizer" not in state:
            raise ConfigError(f"checkpoint {directory} holds no optimizer state for the torch engine "
                              f"(written by another engine?): resume with the same parallel.engine")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed's engine around our model, optimizer and schedule (ZeRO 0-3, bf16, clipping, accumulation)."""

    def __init__(self, model: nn.Module, cfg: Config, layout: Layout, run_dir: Path | None, bf16: bool):
        import deepspeed

        from memtrain.launch.deepspeed_config import MegatronMPU, deepspeed_json

        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.schedule)
        self.json = deepspeed_json(micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                                   zero_stage=cfg.parallel.zero_stage, grad_clip=cfg.optim.grad_clip, bf16=bf16)
        if layout.rank == 0 and run_dir is not None:  # saved with the run, for the record
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed.json").write_text(json.dumps(self.json, indent=2))
        # with CP, DeepSpeed's "data parallel" group is DP × CP (gradients averaged, ZeRO partitioned over both)
        mpu = MegatronMPU(with_context_parallel=layout.cp > 1) if dist.is_initialized() else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.json, mpu=mpu)
        self.module = self.engine.module
        self.zero_stage = cfg.parallel.zero_stage
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.tp_group = tensor_parallel_group() if layout.tp > 1 else None
        self._norm = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed's own protocol is backward + step per micro-batch: it counts micro-steps, reduces
        # gradients and updates only at the accumulation boundary. The trainer already divided the loss
        # by the accumulation steps, so DeepSpeed must not divide again.
        if self.zero_stage > 0:
            # DeepSpeed resets ZeRO's per-micro-step hook state in its own forward, which the trainer bypasses
            # (it calls the model): without this, ZeRO-3 overwrites instead of accumulating micro-batch grads.
            self.engine.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO DeepSpeed clips but keeps no norm; the gradients are DP-averaged by now.
            self._norm = grad_norm(self.params, self.tp_group)
        self.engine.step()

    def step(self) -> float:
        """The update already ran inside the last micro-batch's `backward`; report its gradient norm."""
        if self.zero_stage == 0:
            return float(self._norm)
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

    def save(self, directory: Path) -> dict:
        from memtrain.launch.deepspeed_config import save_engine_state
        save_engine_state(self.engine, directory)
        return {}

    def load(self, directory: Path, state: dict) -> None:
        # DeepSpeed's checkpoint restores the weights too (partitioned ones under ZeRO-3).
        from memtrain.launch.deepspeed_config import load_engine_state
        load_engine_state(self.engine, directory, ConfigError(
            f"checkpoint {directory} holds no DeepSpeed state: resume with the same parallel.engine"))


def build_engine(model: nn.Module, cfg: Config, layout: Layout, run_dir: Path | None, device: torch.device):
    """The engine the config asks for (see ParallelConfig.engine)."""
    from memtrain.launch.deepspeed_config import bf16_supported
    if use_deepspeed(cfg, layout):
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))
        if layout.pp > 1 and cfg.model.memory == "rmt":
            # RMT memory cycles from the last stage back to the first: memtrain's own schedule, fp32
            # ("auto" precision means fp32 there; an explicit bf16 is refused by the engine with one line)
            from memtrain.launch.rmt_pipeline import RMTPipelineEngine
            return RMTPipelineEngine(model, cfg, layout, run_dir, cfg.precision == "bf16")
        if layout.pp > 1:
            from memtrain.launch.pipeline import PipelineEngine
            return PipelineEngine(model, cfg, layout, run_dir, bf16)
        return DeepSpeedEngine(model, cfg, layout, run_dir, bf16)
    if cfg.precision == "bf16":  # "auto" means fp32 for the plain torch loop
        raise ConfigError("precision='bf16' needs the DeepSpeed engine: set parallel.engine='deepspeed' "
                          "(with model.rmt.memory_replay, which needs the torch engine, use precision='fp32')")
    return TorchEngine(model, cfg, layout)
