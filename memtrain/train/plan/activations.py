"""Activation memory of one micro-batch for the planner: each kind's estimate, asked of its spec.

The formulas live with the model (memtrain/model/activations.py for the plain block; a kind's own in the module
its spec names as `plan`, e.g. memtrain/model/memory/titans/plan.py); docs/planner.md has them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from memtrain.model.activations import Shapes, embed_elements, head_elements, shapes  # noqa: F401
from memtrain.model.config import ModelConfig
from memtrain.model.memory import memory_spec

PLAIN = "memtrain.model.activations"


def estimate(cfg: ModelConfig) -> ModuleType:
    """The module with the kind's `layer_elements`, `state_bytes` and `STATE_LABEL` (the plain block's when the
    kind names none: a plugin kind without an estimate)."""
    return importlib.import_module(memory_spec(cfg.memory).plan or PLAIN)


def layer_elements(cfg: ModelConfig, s: Shapes, mode: str = "none") -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) one block keeps for one sequence (B = 1) under checkpoint `mode`."""
    return estimate(cfg).layer_elements(cfg, s, mode)


def state_bytes(cfg: ModelConfig, s: Shapes, layers: int, act_bytes: float) -> float:
    """Memory state (Titans weights, RMT tokens) a micro-batch carries through `layers` blocks."""
    return estimate(cfg).state_bytes(cfg, s, layers, act_bytes)
