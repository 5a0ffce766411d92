"""Who performs an optimizer step: four engines behind one protocol, `Engine`.

    engine = build_engine(model, cfg, layout, run_dir, device)
    loss, norm = engine.train_step(batches, tokens=n)  # grad_accum micro-batches: forward, backward, update
    val = engine.eval_loss(batches)                    # mean loss, no update
    engine.save(dir) / engine.load(dir, state), engine.model_state(), engine.lr, engine.module

| engine | file | when |
|---|---|---|
| `TorchEngine` | local.py | one process, or DP/TP/CP without ZeRO: the reference (plain AdamW, one all-reduce) |
| `DeepSpeedEngine` | deepspeed_engine.py | ZeRO 1-3, bf16; `parallel.engine = "auto"` on more than one process |
| `PipelineEngine` | pipeline.py | `parallel.pp > 1`, kinds whose spec says "stages" (DeepSpeed's pipeline schedule) |
| kind's own | its spec's `pipeline_engine` | `parallel.pp > 1`, kinds with a schedule of their own (the RMT: rmt_pipeline.py) |

Every engine returns the loss averaged over micro-batches and data (× context) parallel ranks, the same number
on every rank, and the single-process gradient norm (`memtrain.train.optim.grad_norm`). Batches are whole
sequences `[B, seq_len]`; `micro_batches` cuts them to the step's length and to this rank's CP slice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from memtrain.launch.groups import Layout
from memtrain.model.memory import memory_spec, resolve

from ..config import Config, resolve_precision


class Engine(Protocol):
    """The interface the trainer (and the parity tests) use; see the module docstring."""

    module: nn.Module

    def train_step(self, batches: list, tokens: int | None = None) -> tuple[float, float]:
        """One optimizer step over `batches` (grad_accum micro-batches); returns (mean loss, gradient norm)."""

    def eval_loss(self, batches: list) -> float:
        """Mean loss over `batches` with the current weights (no update), averaged over DP (× CP) ranks."""

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""

    def model_state(self) -> dict:
        """This rank's weights under the model's names (TP shards; a pipeline stage: its own)."""

    def save(self, directory: Path) -> dict:
        """Write engine state into `directory`; returns what goes into this rank's checkpoint file."""

    def load(self, directory: Path, state: dict) -> None:
        """Restore from `directory` and this rank's checkpoint `state`."""


def micro_batches(batches: list, tokens: int | None = None, local: Callable | None = None,
                  device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The one batch cutter: (inputs, targets) `[B, tokens]` of each batch (objects with .inputs/.targets, or
    pairs), cut to the step's `tokens` (a curriculum), to this rank's context-parallel slice (`local`), on
    `device`."""
    pairs = []
    for b in batches:
        x, y = (b.inputs, b.targets) if hasattr(b, "inputs") else b
        if tokens:
            x, y = x[:, :tokens], y[:, :tokens]
        if local is not None:
            x, y = local(x), local(y)
        pairs.append((x.to(device), y.to(device)) if device is not None else (x, y))
    return pairs


def checkpoint_interval(parallel) -> int:
    """Blocks per recomputed group in the pipeline engines: the explicit interval, else 1 for "full"."""
    if parallel.activation_checkpoint_interval:
        return parallel.activation_checkpoint_interval
    return 1 if parallel.activation_checkpoint == "full" else 0


def use_deepspeed(cfg: Config, layout: Layout) -> bool:
    """Whether the step runs on DeepSpeed (ZeRO, bf16, its pipeline) rather than the plain torch loop."""
    engine = cfg.parallel.engine
    if layout.pp > 1:
        return True  # the pipeline engines
    if engine == "auto":
        own_backward = memory_spec(cfg.model.memory).own_backward(cfg.model)  # e.g. RMT memory replay
        return (layout.world > 1 or cfg.parallel.zero_stage > 0) and not own_backward
    return engine == "deepspeed"


def build_engine(model: nn.Module, cfg: Config, layout: Layout, run_dir: Path | None,
                 device: torch.device) -> Engine:
    """The engine the config and layout ask for (see ParallelConfig.engine and the table above), in the precision
    `cfg.precision` resolves to on `device` (its `precision` attribute: fp32, bf16 or fp16)."""
    precision = resolve_precision(cfg.precision, device.type)
    if use_deepspeed(cfg, layout):
        spec = memory_spec(cfg.model.memory)
        if layout.pp > 1 and spec.pipeline == "own":
            # a schedule of the kind's own (the RMT's memory cycles from the last stage back to the first): it
            # trains in the weights' dtype, so an explicit bf16 is refused by the engine with one line
            engine = resolve(spec.pipeline_engine)(model, cfg, layout, run_dir, cfg.precision == "bf16")
            engine.precision = "fp32"
            return engine
        if layout.pp > 1:
            from .pipeline import PipelineEngine
            engine = PipelineEngine(model, cfg, layout, run_dir, precision == "bf16")
        else:
            from .deepspeed_engine import DeepSpeedEngine
            engine = DeepSpeedEngine(model, cfg, layout, run_dir, precision)
        engine.precision = precision
        return engine
    from .local import TorchEngine
    return TorchEngine(model, cfg, layout, precision)


__all__ = ["Engine", "build_engine", "checkpoint_interval", "micro_batches", "use_deepspeed"]
